"""Reasoning parsers (``--reasoning-parser``): a chat completion's text split into
``reasoning_content`` (the model's thinking, between ``<think>`` and ``</think>``) and
``content`` (the answer after it), streamed and not.

- ``deepseek_r1``: the output starts inside the reasoning (the chat template opens
  ``<think>`` in the prompt; a leading ``<think>`` in the output is dropped too); everything
  before ``</think>`` is reasoning, everything after it content. Without ``</think>`` (cut by
  length) it is all reasoning.
- ``qwen3``: an output that starts with ``<think>`` reasons until ``</think>`` (or its end);
  any other output is all content (thinking switched off).

The non-streamed split is the streamed one fed the whole text at once, so streamed deltas
always add up to the non-streamed fields. While streaming, text that could be the start of
a tag is held back until the next delta shows what it is.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def parser_name(name: str) -> str:
    """The canonical parser name (``deepseek-r1`` -> ``deepseek_r1``); ValueError if unknown."""
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(PARSERS)}")
    return canonical


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """One choice's text, fed delta by delta; ``feed`` returns the (reasoning, content) text
    that is certain so far."""

    def __init__(self, parser: str) -> None:
        self.starts_in_reasoning = parser_name(parser) == "deepseek_r1"
        self.mode = "start"  # looking for an optional leading <think>
        self.held = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        buf = self.held + delta
        reasoning, content = [], []
        while True:
            if self.mode == "start":
                if buf.startswith(START):
                    buf = buf[len(START):]
                    self.mode = "reasoning"
                    continue
                if START.startswith(buf) and not final:
                    break  # too short to tell yet (possibly empty)
                self.mode = "reasoning" if self.starts_in_reasoning else "content"
                continue
            if self.mode == "reasoning":
                end = buf.find(END)
                if end >= 0:
                    reasoning.append(buf[:end])
                    buf = buf[end + len(END):]
                    self.mode = "content"
                    continue
                keep = 0 if final else _partial_suffix(buf, END)
                reasoning.append(buf[:len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
            content.append(buf)
            buf = ""
            break
        self.held = buf
        return "".join(reasoning), "".join(content)


def split(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; None where a part is empty."""
    reasoning, content = ReasoningStream(parser).feed(text, final=True)
    return reasoning or None, content or None
