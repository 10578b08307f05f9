"""Chat templates: the jinja2 program a model ships to turn messages into its prompt format.

Templates come from model files, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment and only see plain JSON-like data. The environment matches
transformers' (trim_blocks, lstrip_blocks, loopcontrols, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, a `{% generation %}` block) so a template renders here
exactly as it does there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compiles once per distinct template text (a server renders the same one per request)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template is not valid jinja2: {e}") from e


def _plain(value: Any, where: str) -> Any:
    """A copy made only of JSON types, so the sandbox never sees objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(
        f"{where} is a {type(value).__name__}; chat messages may only hold strings, numbers, "
        f"booleans, None, lists and dicts"
    )


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Renders `messages` (dicts with at least "role") through the template `source`.

    `special_tokens` (bos_token, eos_token, ...) are visible to the template, as in
    transformers; extra keyword arguments too (e.g. enable_thinking) and override them.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
    context: dict[str, Any] = dict(special_tokens or {})
    context.update(_plain(kwargs, "chat template argument"))
    try:
        return compile_template(source).render(
            messages=_plain(messages, "messages"),
            tools=_plain(tools, "tools"),
            documents=_plain(documents, "documents"),
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"the chat template tried an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() in templates reports bad conversations (e.g. roles out of order).
        raise ValueError(f"the chat template rejected these messages: {e}") from e
