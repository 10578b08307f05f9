"""Tool-call parsers (``--tool-call-parser``): a chat completion's text split into
``content`` and OpenAI-style tool calls (a name and the arguments' JSON text), for a whole
output and incrementally while streaming.

Formats:

- ``hermes`` (alias ``qwen``; Qwen2.5, Qwen3, Hermes): zero or more
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks after the content. The
  last block may lack its ``</tool_call>`` (models stop right after the object; vLLM reads
  that too).
- ``llama3_json`` (Llama 3.1-3.3): the whole output, after optional whitespace and an
  optional ``<|python_tag|>``, is one ``{"name": ..., "parameters": {...}}`` object or several
  separated by ``;``. An output that does not start so is all content.
- ``mistral``: content, then ``[TOOL_CALLS]`` and a JSON array of call objects (older models,
  and tool_choice "required", whose constrained output is read as this array), or one or
  more ``[TOOL_CALLS]NAME[ARGS]{...}`` (tokenizer v11 and later).
- ``deepseek_v3``: content, then ``<｜tool▁calls▁begin｜>``, one or more calls, then
  ``<｜tool▁calls▁end｜>`` (which may be missing at the end of the output). A call is
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` + a fenced ```json block +
  ``<｜tool▁call▁end｜>`` (V3), or
  ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` (V3.1).

In call objects the arguments key is ``arguments`` or ``parameters`` (either format's
models write both); ``type`` and ``id`` keys are allowed and ignored; any other key, a
repeated key or a missing name makes the text not a tool call. Arguments are the JSON
object's text exactly as the model wrote it; arguments written as a JSON string holding the
object's text are that decoded text; none (or ``null``) is ``"{}"``. Content before the
first call loses its trailing whitespace; content that is only whitespace is None. Text
other than whitespace after or between calls makes the whole output not a tool call.

Why one state machine per format (a ``ToolStream``) and ``parse`` = that machine fed the
whole text at once: streamed deltas then add up to the non-streamed result for every way
the text is split into deltas. The machine keeps its place (and a small JSON scanner's
state: strings, escapes, nesting), so each delta is looked at once: content is emitted as
soon as it cannot be the start of a tool-call marker, names as soon as their string closes,
argument fragments as the model writes them.

Malformed or incomplete tool-call text (invalid JSON, a call without a name, an output cut
mid-call, stray text after the calls): ``parse`` returns the whole text as content and no
calls, as vLLM does. A stream cannot take back deltas it already sent: from the point where
it sees the text is not a tool call (at the latest at ``final=True``) it emits as content
the text of the failed call (from the marker or separator that opened it, with the
whitespace before that) and everything after. Its content then adds up to the whole text
whenever the failure is in the first call, but call deltas sent before the failure (a name,
argument fragments) stand, and the non-streamed answer has no calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PARSERS",
    "CallDelta",
    "DeepSeekV3Parser",
    "HermesParser",
    "Llama3JsonParser",
    "MistralParser",
    "Parsed",
    "ParsedCall",
    "ToolParser",
    "ToolStream",
    "detect_parser",
    "get_parser",
]

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"
DS_FENCE_OPEN, DS_FENCE_CLOSE = "```json", "```"

_ARG_KEYS = frozenset({"arguments", "parameters"})
_IGNORED_KEYS = frozenset({"type", "id"})
_MAX_NAME = 256  # a name written as plain text (mistral, deepseek) longer than this: not a call

_JSON_WS = re.compile(r"[ \t\n\r]*")
_SPACE = re.compile(r"\s*")
_STRING_STOP = re.compile(r'["\\]')
_NESTED_STOP = re.compile(r'["{}\[\]]')
_LITERAL = re.compile(r"[-+.0-9A-Za-z]*")
_MISTRAL_NAME = re.compile(r"[\w.\-]*")
_DS_BAD_NAME = re.compile(r"[\n{}\[\]<>\"]")


@dataclass
class ParsedCall:
    """One tool call of a whole output."""

    name: str
    arguments: str  # the arguments' JSON text as written (stripped); "{}" when none


@dataclass
class Parsed:
    """A whole output read: the content around the calls, and the calls."""

    content: str | None  # None when there is no non-whitespace content
    calls: list[ParsedCall]


@dataclass
class CallDelta:
    """A piece of one call while streaming: its name once (in its first CallDelta, before or
    with its first arguments fragment), then further fragments of its arguments text."""

    index: int  # which call (0, 1, ...) in output order
    name: str | None = None
    arguments: str = ""


class _Malformed(Exception):
    """The text seen so far cannot be a tool call of the parser's format."""


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise _Malformed from e


def _match_end(pattern: re.Pattern[str], s: str, i: int) -> int:
    """Where a match of ``pattern`` (one that may be empty) at ``s[i]`` ends."""
    m = pattern.match(s, i)
    return m.end() if m else i


def _partial_suffix(buf: str, marker: str, start: int) -> int:
    """Length of the longest suffix of ``buf[start:]`` that is a proper prefix of ``marker``:
    text that may still become the marker, so it cannot be emitted yet."""
    for n in range(min(len(marker) - 1, len(buf) - start), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


class _JsonScan:
    """Finds where one JSON value ends, fed piece by piece, without parsing it: strings (with
    escapes), nesting of ``{}`` and ``[]``, literals. Its state lives between pieces, so no
    text is looked at twice; ``json.loads`` checks the value once it is whole."""

    __slots__ = ("kind", "depth", "in_string", "escaped", "done")

    def __init__(self) -> None:
        self.kind = ""  # "nested", "string" or "literal" once the first character is seen
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def feed(self, s: str, i: int) -> int:
        """Consume the value's text from ``s[i]`` on; the index after the consumed part.
        ``done`` is set once the value ended: a nested value or string with its closing
        character (consumed), a literal at the first character after it (not consumed)."""
        n = len(s)
        if not self.kind:
            if i >= n:
                return i
            c = s[i]
            if c in "{[":
                self.kind, self.depth = "nested", 1
                i += 1
            elif c == '"':
                self.kind, self.in_string = "string", True
                i += 1
            elif c in "-+.0123456789" or c.isascii() and c.isalpha():
                self.kind = "literal"
            else:
                raise _Malformed
        if self.kind == "literal":
            end = _match_end(_LITERAL, s, i)
            if end < n:
                self.done = True
            return end
        while i < n:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                    i += 1
                    continue
                m = _STRING_STOP.search(s, i)
                if m is None:
                    return n
                i = m.end()
                if s[i - 1] == "\\":
                    self.escaped = True
                else:
                    self.in_string = False
                    if self.kind == "string":
                        self.done = True
                        return i
            else:
                m = _NESTED_STOP.search(s, i)
                if m is None:
                    return n
                i = m.end()
                c = s[i - 1]
                if c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        self.done = True
                        return i
        return i


class _Args:
    """One call's arguments value. An object streams out as written (fragment by fragment);
    a JSON string holding the object's text is decoded and sent whole once it closes (its
    text is not the arguments until decoded); ``null`` means none."""

    def __init__(self, stream: ToolStream) -> None:
        self._stream = stream
        self._scan = _JsonScan()
        self._kind = ""
        self._text: list[str] = []
        self.done = False

    def feed(self, buf: str, i: int) -> int:
        n = len(buf)
        if not self._kind:
            i = _match_end(_JSON_WS, buf, i)
            if i == n:
                return i
            self._kind = buf[i]
            if self._kind not in '{"n':
                raise _Malformed  # arguments are an object
        j = self._scan.feed(buf, i)
        piece = buf[i:j]
        self._text.append(piece)
        if self._kind == "{":
            self._stream._call_args(piece)
        if self._scan.done:
            self.done = True
            value = _loads("".join(self._text))
            if self._kind == '"':
                text = value.strip()
                if text and not isinstance(_loads(text), dict):
                    raise _Malformed
                self._stream._call_args(text or "{}")
            elif self._kind == "n":
                if value is not None:
                    raise _Malformed
                self._stream._call_args("{}")
        return j


class _CallObject:
    """One ``{"name": ..., "arguments": ...}`` object, scanned as it comes: the name goes out
    when its string closes, the arguments as they are written (held by the stream while the
    name is unknown), and the whole object is checked with ``json.loads`` at its ``}``."""

    def __init__(self, stream: ToolStream) -> None:
        self._stream = stream
        self._state = "open"
        self._slots: set[str] = set()
        self._key = ""
        self._scan = _JsonScan()
        self._captured: list[str] = []  # the key or name string being read
        self._args: _Args | None = None
        self._text: list[str] = []
        self._has_name = False
        self.done = False

    def feed(self, buf: str, i: int) -> int:
        """Consume the object's text from ``buf[i]`` on; the index after the consumed part
        (the end of ``buf`` unless the object closed)."""
        start = i
        i = self._run(buf, i)
        self._text.append(buf[start:i])
        if self.done:
            if not isinstance(_loads("".join(self._text)), dict) or not self._has_name:
                raise _Malformed
            if "arguments" not in self._slots:
                self._stream._call_args("{}")
        return i

    def _run(self, buf: str, i: int) -> int:
        n = len(buf)
        while i < n:
            state = self._state
            if state in ("key", "name", "other"):
                j = self._scan.feed(buf, i)
                if state != "other":
                    self._captured.append(buf[i:j])
                i = j
                if self._scan.done:
                    self._value_read(state)
                continue
            if state == "args":
                assert self._args is not None
                i = self._args.feed(buf, i)
                if self._args.done:
                    self._state = "after_value"
                continue
            i = _match_end(_JSON_WS, buf, i)
            if i == n:
                break
            c = buf[i]
            if state == "open":
                if c != "{":
                    raise _Malformed
                self._state = "first_key"
            elif state in ("first_key", "next_key"):
                if c != '"':
                    raise _Malformed  # includes {}: an object naming no function
                self._start_string("key")
                continue
            elif state == "colon":
                if c != ":":
                    raise _Malformed
                self._state = "value"
            elif state == "value":
                if self._key == "name":
                    if c != '"':
                        raise _Malformed
                    self._start_string("name")
                elif self._key in _ARG_KEYS:
                    self._args = _Args(self._stream)
                    self._state = "args"
                else:
                    self._scan = _JsonScan()
                    self._state = "other"
                continue
            elif state == "after_value":
                if c == ",":
                    self._state = "next_key"
                elif c == "}":
                    self.done = True
                    return i + 1
                else:
                    raise _Malformed
            i += 1
        return i

    def _start_string(self, state: str) -> None:
        self._scan = _JsonScan()
        self._captured = []
        self._state = state

    def _value_read(self, state: str) -> None:
        text = _loads("".join(self._captured))
        if state == "key":
            slot = "arguments" if text in _ARG_KEYS else text
            if slot in self._slots or slot != "name" and slot != "arguments" and (
                    slot not in _IGNORED_KEYS):
                raise _Malformed
            self._slots.add(slot)
            self._key = text
            self._state = "colon"
            return
        if state == "name":
            self._has_name = True
            self._stream._call_name(text)
        self._state = "after_value"


class ToolStream:
    """One output's text fed delta by delta; ``feed`` returns the content and call deltas
    that are certain so far. One subclass per format: a state machine whose states are the
    ``_st_*`` methods, each consuming from ``_buf`` at ``_pos`` and returning whether it
    made progress (False: it needs more text)."""

    _START = "content"
    _ACCEPT: frozenset[str] = frozenset()  # states in which the output may end
    _COMMIT_AT_CALL_END = True  # False: the format's closing tag ends a call's text

    def __init__(self) -> None:
        self._buf = ""  # text fed but not consumed yet (a few characters, normally)
        self._pos = 0
        self._state = self._START
        self._content: list[str] = []  # this feed's content
        self._deltas: list[CallDelta] = []  # this feed's call deltas
        self._spaces: list[str] = []  # trailing whitespace of the content, held
        self._said = False  # some content was emitted
        self._raw: list[str] = []  # text of the unfinished call, for a malformed flush
        self._index = 0  # the call being read
        self._named = False  # its name went out
        self._early: list[str] = []  # its arguments written before its name
        self._call: _CallObject | None = None
        self._args: _Args | None = None
        self._after = ""  # the state after the current call object or arguments
        self._malformed = False
        self._finished = False
        self._clean = False  # at final: the output read as this format (parse's calls stand)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        """Next piece of output text -> (content to emit now, call deltas to emit now).
        ``final=True`` on the last piece flushes whatever was held back."""
        if self._finished:
            raise RuntimeError("feed() after final=True")
        self._buf += delta  # _buf holds only the unconsumed rest
        self._pos = 0
        if self._malformed:
            self._emit(self._buf)
            self._pos = len(self._buf)
        else:
            try:
                while getattr(self, "_st_" + self._state)():
                    pass
            except _Malformed:
                self._fail()
        if final:
            self._finish()
        self._buf = self._buf[self._pos:]
        self._pos = 0
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    # -- output ---------------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._said = True

    def _content_text(self, text: str) -> None:
        """Content a call may still follow: its trailing whitespace is held back, since
        content before a call loses it."""
        body = text.rstrip()
        if body:
            self._emit("".join(self._spaces) + body)
            self._spaces = [text[len(body):]]
        elif text:
            self._spaces.append(text)

    def _call_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise _Malformed
        self._named = True
        self._deltas.append(CallDelta(self._index, name, "".join(self._early)))
        self._early = []

    def _call_args(self, fragment: str) -> None:
        if not fragment:
            return
        if not self._named:
            self._early.append(fragment)
        elif self._deltas and self._deltas[-1].index == self._index:
            self._deltas[-1].arguments += fragment  # one delta per call per feed
        else:
            self._deltas.append(CallDelta(self._index, None, fragment))

    def _end_call(self) -> None:
        """The call is whole; unless the format closes it later, its text will not be
        flushed as content any more."""
        if not self._named:
            raise _Malformed
        self._index += 1
        self._named = False
        if self._COMMIT_AT_CALL_END:
            self._raw = []

    def _fail(self) -> None:
        """Not a tool call after all: the unfinished call's text and the rest are content."""
        self._malformed = True
        self._emit("".join(self._raw) + self._buf[self._pos:])
        self._raw = []
        self._pos = len(self._buf)

    def _finish(self) -> None:
        self._finished = True
        if self._malformed:
            return
        if self._state == "content":
            self._content_text(self._buf[self._pos:])
            self._pos = len(self._buf)
            if self._said:
                self._emit("".join(self._spaces))
            self._clean = True
        elif self._state in self._ACCEPT and self._pos == len(self._buf):
            self._clean = True
        elif self._state == self._START and not (
                "".join(self._raw) + self._buf[self._pos:]).strip():
            self._pos = len(self._buf)  # only whitespace (llama3_json's start): no content
            self._clean = True
        else:
            self._fail()

    # -- consuming ------------------------------------------------------------------------

    def _take_to(self, j: int) -> None:
        if j > self._pos:
            self._raw.append(self._buf[self._pos:j])
            self._pos = j

    def _skip_space(self) -> bool:
        """Consume whitespace; whether a character other than whitespace follows."""
        self._take_to(_match_end(_SPACE, self._buf, self._pos))
        return self._pos < len(self._buf)

    def _expect(self, *tokens: str) -> str | None:
        """Consume the token the text goes on with; None if the text so far is a prefix of
        one (more is needed)."""
        buf, pos = self._buf, self._pos
        for token in tokens:
            if buf.startswith(token, pos):
                self._take_to(pos + len(token))
                return token
        rest = buf[pos:pos + max(map(len, tokens))]
        if any(token.startswith(rest) for token in tokens):
            return None
        raise _Malformed

    def _scan_content(self, marker: str, then: str) -> bool:
        """Content up to ``marker``: emitted except a tail that may start the marker."""
        buf, pos = self._buf, self._pos
        j = buf.find(marker, pos)
        if j < 0:
            end = len(buf) - _partial_suffix(buf, marker, pos)
            self._content_text(buf[pos:end])
            self._pos = end
            return False
        self._content_text(buf[pos:j])
        self._raw = [*self._spaces, marker]  # dropped, unless the call turns out malformed
        self._spaces = []
        self._pos = j + len(marker)
        self._state = then
        return True

    def _start_object(self, after: str) -> None:
        self._call = _CallObject(self)
        self._after = after
        self._state = "object"

    def _st_object(self) -> bool:
        assert self._call is not None
        self._take_to(self._call.feed(self._buf, self._pos))
        if not self._call.done:
            return False
        self._end_call()
        self._state = self._after
        return True

    def _start_args(self, after: str) -> None:
        self._args = _Args(self)
        self._after = after
        self._state = "args"

    def _st_args(self) -> bool:
        assert self._args is not None
        self._take_to(self._args.feed(self._buf, self._pos))
        if not self._args.done:
            return False
        self._state = self._after
        return True

    def _st_text(self) -> bool:
        self._emit(self._buf[self._pos:])
        self._pos = len(self._buf)
        return False


class _HermesStream(ToolStream):
    _ACCEPT = frozenset({"after_object", "between"})
    _COMMIT_AT_CALL_END = False  # a block's text runs to its </tool_call>

    def _st_content(self) -> bool:
        return self._scan_content(HERMES_START, "open")

    def _st_open(self) -> bool:
        if not self._skip_space():
            return False
        self._start_object("after_object")
        return True

    def _st_after_object(self) -> bool:
        if not self._skip_space() or self._expect(HERMES_END) is None:
            return False
        self._raw = []
        self._state = "between"
        return True

    def _st_between(self) -> bool:
        if not self._skip_space() or self._expect(HERMES_START) is None:
            return False
        self._state = "open"
        return True


class _Llama3JsonStream(ToolStream):
    _START = "start"
    _ACCEPT = frozenset({"text", "after_object", "next"})

    def _st_start(self) -> bool:
        if not self._skip_space():
            return False  # leading whitespace decides nothing
        buf, pos = self._buf, self._pos
        if buf.startswith(PYTHON_TAG, pos) or buf[pos] == "{":
            if buf[pos] != "{":
                self._take_to(pos + len(PYTHON_TAG))
            self._state = "first"
            return True
        if PYTHON_TAG.startswith(buf[pos:pos + len(PYTHON_TAG)]):
            return False
        self._emit("".join(self._raw))  # not a tool call: all content, as written
        self._raw = []
        self._state = "text"
        return True

    def _st_first(self) -> bool:
        if not self._skip_space():
            return False
        self._start_object("after_object")
        return True

    _st_next = _st_first  # after a ";", where the output may also end

    def _st_after_object(self) -> bool:
        if not self._skip_space():
            return False
        if self._buf[self._pos] != ";":
            raise _Malformed
        self._take_to(self._pos + 1)
        self._state = "next"
        return True


class _MistralStream(ToolStream):
    _ACCEPT = frozenset({"array_done", "named_done"})

    def _st_content(self) -> bool:
        return self._scan_content(MISTRAL_CALLS, "calls")

    def _st_calls(self) -> bool:
        if not self._skip_space():
            return False
        if self._buf[self._pos] == "[":
            self._take_to(self._pos + 1)
            self._state = "array_item"
        else:
            self._state = "name"
        return True

    def _st_array_item(self) -> bool:
        if not self._skip_space():
            return False
        if self._buf[self._pos] != "{":
            raise _Malformed  # includes an empty array: no call
        self._start_object("array_next")
        return True

    def _st_array_next(self) -> bool:
        if not self._skip_space():
            return False
        c = self._buf[self._pos]
        if c not in ",]":
            raise _Malformed
        self._take_to(self._pos + 1)
        self._state = "array_item" if c == "," else "array_done"
        return True

    def _st_array_done(self) -> bool:
        if not self._skip_space() or self._expect(MISTRAL_CALLS) is None:
            return False
        self._state = "calls"
        return True

    def _st_name(self) -> bool:
        buf, pos = self._buf, self._pos
        j = buf.find("[", pos)
        name = buf[pos:j] if j >= 0 else buf[pos:]
        if len(name) > _MAX_NAME or not _MISTRAL_NAME.fullmatch(name):
            raise _Malformed
        if j < 0:
            return False  # the name goes on
        if not buf.startswith(MISTRAL_ARGS, j):
            if MISTRAL_ARGS.startswith(buf[j:j + len(MISTRAL_ARGS)]):
                return False
            raise _Malformed
        self._take_to(j + len(MISTRAL_ARGS))
        self._call_name(name)
        self._start_args("named_end")
        return True

    def _st_named_end(self) -> bool:
        self._end_call()
        self._state = "named_done"
        return True

    def _st_named_done(self) -> bool:
        if not self._skip_space() or self._expect(MISTRAL_CALLS) is None:
            return False
        self._state = "calls"
        return True


class _DeepSeekV3Stream(ToolStream):
    _ACCEPT = frozenset({"between", "done"})

    def _st_content(self) -> bool:
        return self._scan_content(DS_CALLS_BEGIN, "first")

    def _st_first(self) -> bool:
        if not self._skip_space() or self._expect(DS_CALL_BEGIN) is None:
            return False
        self._state = "header"
        return True

    def _line(self, end: str) -> str | None:
        """Plain text up to ``end`` (a name, or V3's call type), consumed with ``end``; None
        while ``end`` has not come."""
        buf, pos = self._buf, self._pos
        j = buf.find(end, pos)
        head = buf[pos:j] if j >= 0 else buf[pos:len(buf) - _partial_suffix(buf, end, pos)]
        if len(head) > _MAX_NAME or _DS_BAD_NAME.search(head):
            raise _Malformed
        if j < 0:
            return None
        self._take_to(j + len(end))
        return head.strip()

    def _st_header(self) -> bool:
        head = self._line(DS_SEP)
        if head is None:
            return False
        if head == "function":
            self._state = "typed"  # V3; or V3.1 calling a function named "function"
        else:
            self._call_name(head)  # V3.1
            self._start_args("call_end")
        return True

    def _st_typed(self) -> bool:
        if self._pos == len(self._buf):
            return False
        if self._buf[self._pos] == "{":
            self._call_name("function")
            self._start_args("call_end")
        else:
            self._state = "v3_name"
        return True

    def _st_v3_name(self) -> bool:
        name = self._line("\n")
        if name is None:
            return False
        self._call_name(name)
        self._state = "fence"
        return True

    def _st_fence(self) -> bool:
        if not self._skip_space() or self._expect(DS_FENCE_OPEN) is None:
            return False
        self._start_args("fence_close")
        return True

    def _st_fence_close(self) -> bool:
        if not self._skip_space() or self._expect(DS_FENCE_CLOSE) is None:
            return False
        self._state = "call_end"
        return True

    def _st_call_end(self) -> bool:
        if not self._skip_space() or self._expect(DS_CALL_END) is None:
            return False
        self._end_call()
        self._state = "between"
        return True

    def _st_between(self) -> bool:
        if not self._skip_space():
            return False
        token = self._expect(DS_CALL_BEGIN, DS_CALLS_END)
        if token is None:
            return False
        self._state = "header" if token == DS_CALL_BEGIN else "done"
        return True

    def _st_done(self) -> bool:
        if self._skip_space():
            raise _Malformed  # text after the calls
        return False


class ToolParser:
    """A tool-call format: ``parse`` reads a whole output, ``stream`` a fresh incremental
    reader of one output. ``parse`` is the stream fed the whole text, so the two agree."""

    name: str = ""
    _stream: type[ToolStream] = ToolStream

    def parse(self, text: str) -> Parsed:
        """(content, calls) of a whole output; the whole text as content and no calls when
        it is not well-formed tool-call text of this format."""
        stream = self.stream()
        content, deltas = stream.feed(text, final=True)
        if not stream._clean:
            return Parsed(text if text.strip() else None, [])
        calls: list[ParsedCall] = []
        for d in deltas:
            if d.name is not None:
                calls.append(ParsedCall(d.name, d.arguments))
            else:
                calls[d.index].arguments += d.arguments
        return Parsed(content or None, calls)

    def stream(self) -> ToolStream:
        return self._stream()


class HermesParser(ToolParser):
    name = "hermes"
    _stream = _HermesStream


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    _stream = _Llama3JsonStream


class MistralParser(ToolParser):
    name = "mistral"
    _stream = _MistralStream


class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    _stream = _DeepSeekV3Stream


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "deepseek_v3": DeepSeekV3Parser,
}


def get_parser(name: str) -> ToolParser:
    """The parser called ``name`` (``llama3-json`` and other spellings with dashes or
    capitals too); ValueError naming the known ones otherwise."""
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose from "
                         f"{', '.join(PARSERS)}")
    return PARSERS[canonical]()


def detect_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template shows (the markers it writes an assistant's
    earlier calls with, or tells the model to use), so that tool_choice "auto" works
    without --tool-call-parser; None when it shows none of the known ones."""
    if not chat_template:
        return None
    if HERMES_START in chat_template:
        return "hermes"
    if MISTRAL_CALLS in chat_template:
        return "mistral"
    if "tool▁calls▁begin" in chat_template:
        return "deepseek_v3"
    if PYTHON_TAG in chat_template or (
            "ipython" in chat_template and "parameters" in chat_template):
        return "llama3_json"
    return None
