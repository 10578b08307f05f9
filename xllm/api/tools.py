"""Tool calling on /v1/chat/completions: what ``tools`` and ``tool_choice`` ask for, the
messages the chat template renders, and the calls read back from the output.

- ``none``: the tools go to the template (it may describe them); the output is content.
- ``auto`` (the default with tools): the output is read by the tool-call parser of
  ``--tool-call-parser``, or the one whose format the chat template shows
  (``xllm.api.tool_parsers.detect_parser``); a model that calls no tool answers content.
- ``required``: constrained decoding makes the output a JSON array of one or more
  ``{"name": ..., "arguments": ...}`` objects, each naming a tool and matching its parameter
  schema (at most one with ``parallel_tool_calls: false``); it is read as the mistral
  parser reads its ``[TOOL_CALLS]`` arrays.
- a named function: constrained decoding makes the output that function's arguments (its
  parameter schema); the answer is one call to it, finish_reason "stop" (as OpenAI).

Arguments are the JSON text the model wrote, streamed as it writes them: the stream's
fragments concatenate to the non-streamed ``arguments``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from xllm.api.errors import APIError
from xllm.api.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from xllm.api.tool_parsers import ToolParser, detect_parser, get_parser
from xllm.structured import GrammarSpec
from xllm.structured.grammar import check_json_schema

__all__ = ["ToolPlan", "ToolStreamer", "plan_tools", "template_messages"]

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_ARRAY_MARK = "[TOOL_CALLS]"  # the required mode's array is read as mistral's


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict[str, Any]] | None = None  # for the chat template
    parser: ToolParser | None = None  # auto and required
    function: str | None = None  # named
    spec: GrammarSpec | None = None  # required and named: the output's grammar

    @property
    def reads_calls(self) -> bool:
        return self.mode != "none"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            assert self.function is not None
            return None, [ToolCall(id=new_call_id(), function=FunctionCall(
                name=self.function, arguments=text.strip()))]
        assert self.parser is not None
        parsed = self.parser.parse(_ARRAY_MARK + text if self.mode == "required" else text)
        if not parsed.calls:  # not calls after all (a required array cut off by max_tokens)
            return text or None, []
        calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name,
                                                                   arguments=c.arguments))
                 for c in parsed.calls]
        return parsed.content, calls

    def streamer(self) -> ToolStreamer:
        return ToolStreamer(self)


@dataclass
class ToolStreamer:
    """One choice's stream: output text deltas -> (content delta, tool-call deltas)."""

    plan: ToolPlan
    ids: list[str] = field(default_factory=list)  # the calls begun so far
    _stream: Any = None

    def __post_init__(self) -> None:
        if self.plan.parser is not None:
            self._stream = self.plan.parser.stream()
            if self.plan.mode == "required":
                self._stream.feed(_ARRAY_MARK)

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        if self.plan.mode == "none":
            return text, []
        if self.plan.mode == "named":
            deltas = []
            if not self.ids:  # the call begins before its arguments
                self.ids.append(new_call_id())
                text = text.lstrip()
                deltas.append(DeltaToolCall(index=0, id=self.ids[0], type="function",
                                            function=DeltaFunctionCall(name=self.plan.function,
                                                                       arguments=text)))
            elif text:
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text)))
            return "", deltas
        content, pieces = self._stream.feed(text, final)
        deltas = []
        for piece in pieces:
            if piece.name is not None:
                while len(self.ids) <= piece.index:
                    self.ids.append(new_call_id())
                deltas.append(DeltaToolCall(
                    index=piece.index, id=self.ids[piece.index], type="function",
                    function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments)))
            elif piece.arguments:
                deltas.append(DeltaToolCall(index=piece.index,
                                            function=DeltaFunctionCall(arguments=piece.arguments)))
        return content, deltas


def _function_schema(tool: Any) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def plan_tools(req: ChatCompletionRequest, parser_name: str | None,
               chat_template: str | None) -> ToolPlan:
    """What the request's tools and tool_choice ask for; a 400 for a choice that cannot be
    served (no tools, an unknown function, auto with no known format, a clash with
    response_format)."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    rendered = [t.model_dump(exclude_none=True) for t in tools] or None
    if choice == "none":
        return ToolPlan("none", rendered)
    if not tools:
        raise APIError.bad_request("tool_choice needs tools: give the functions the model may "
                                   "call, or leave tool_choice out", param="tool_choice")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError.bad_request("tools must have distinct function names", param="tools")
    if choice == "auto":
        name = parser_name or detect_parser(chat_template)
        if name is None:
            raise APIError.bad_request(
                'tool_choice "auto" needs to know how this model writes tool calls; start the '
                "server with --tool-call-parser (hermes, llama3_json, mistral, deepseek_v3), or "
                'use tool_choice "required" or a named function', param="tool_choice")
        return ToolPlan("auto", rendered, parser=get_parser(name))
    for i, t in enumerate(tools):  # constrained by them: each must be a valid schema
        try:
            check_json_schema(_function_schema(t))
        except ValueError as e:
            raise APIError.bad_request(f"tools[{i}].function.parameters: {e}",
                                       param="tools") from e
    if req.response_format is not None and req.response_format.type != "text" or (
            req.structured_outputs is not None):
        raise APIError.bad_request("a required or named tool_choice constrains the output "
                                   "itself; leave out response_format and structured_outputs",
                                   param="tool_choice")
    if choice == "required":
        items = [{"type": "object",
                  "properties": {"name": {"const": t.function.name},
                                 "arguments": _function_schema(t)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", rendered, parser=get_parser("mistral"),
                        spec=GrammarSpec.json_schema(schema))
    wanted = choice.function.name  # type: ignore[union-attr]
    tool = next((t for t in tools if t.function.name == wanted), None)
    if tool is None:
        raise APIError.bad_request(f"tool_choice names the function {wanted!r}, which is not "
                                   f"in tools ({', '.join(names)})", param="tool_choice")
    return ToolPlan("named", rendered, function=wanted,
                    spec=GrammarSpec.json_schema(_function_schema(tool)))


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as chat templates take it: text content, an assistant's tool_calls
    (arguments as objects where they parse: templates write them with tojson), a tool
    message's tool_call_id."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out
