"""--tool-call-parser: content and tool calls read from a model's output, whole and streamed.

The contract checked everywhere: for an output that reads as tool calls, any split of it
into deltas streams content and call deltas that add up to ``parse`` of the whole text.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.api.tool_parsers import (
    PARSERS,
    CallDelta,
    DeepSeekV3Parser,
    HermesParser,
    Parsed,
    ParsedCall,
    detect_parser,
    get_parser,
)

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

# Arguments whose strings hold braces, brackets, quotes, escapes and unicode: a scanner that
# counts brackets inside strings, or misses an escaped quote, ends the value in the wrong place.
TRICKY = ('{"query": "SELECT \'{x}\' FROM t WHERE s = \\"a\\\\\\\\b\\" -- }]", '
          '"opts": {"limit": [1, 2, {"deep": null}], "tag": "caf\\u00e9 ☕ 日本", '
          '"esc": "\\\\\\"}\\n\\t\\/"}}')
assert json.loads(TRICKY)["opts"]["limit"][2] == {"deep": None}
WEATHER = '{"location": "San Francisco, CA", "unit": "fahrenheit"}'


def q(args: str) -> str:
    """``args`` as a JSON string (the arguments-as-string form)."""
    return json.dumps(args)


def ds_v3(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def ds_v31(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


# (parser, output as the model writes it, content, [(name, arguments)])
RECORDED: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    # hermes / qwen
    ("hermes", f'<tool_call>\n{{"name": "get_current_weather", "arguments": {WEATHER}}}\n'
     "</tool_call>", None, [("get_current_weather", WEATHER)]),
    ("qwen", '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": '
     '"San Francisco, CA, USA"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", '
     '"arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>',
     None, [("get_current_temperature", '{"location": "San Francisco, CA, USA"}'),
            ("get_temperature_date", '{"location": "San Francisco, CA, USA", "date": '
             '"2024-10-01"}')]),
    ("hermes", "I'll look that up for you.\n\n<tool_call>\n"
     f'{{"name": "run_sql", "arguments": {TRICKY}}}\n</tool_call>',
     "I'll look that up for you.", [("run_sql", TRICKY)]),
    ("hermes", '\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n', None,
     [("get_time", "{}")]),
    ("hermes", '<tool_call>\n{"name": "list_files"}\n</tool_call>', None,
     [("list_files", "{}")]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": null}\n</tool_call>', None,
     [("f", "{}")]),
    ("hermes", '<tool_call>\n{"arguments": {"x": [1, {"y": "}"}]}, "name": "late"}\n'
     "</tool_call>", None, [("late", '{"x": [1, {"y": "}"}]}')]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": ' + q(' {"a": 1, "b": "}"} ') + "}\n"
     "</tool_call>", None, [("f", '{"a": 1, "b": "}"}')]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": ""}\n</tool_call>', None, [("f", "{}")]),
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "<tool_call> inside"}}',
     None, [("search", '{"q": "<tool_call> inside"}')]),  # cut before </tool_call>: read
    ("hermes", '<tool_call>{"type": "function", "name": "f", "arguments":{"a":1}}</tool_call>'
     '<tool_call>{"name":"g","arguments":{ }}</tool_call>', None,
     [("f", '{"a":1}'), ("g", "{ }")]),
    ("hermes", 'Sure: a < b, and <b>bold</b>.  \n<tool_call>\n{"name": "f", "arguments": '
     '{"k": "v"}}\n</tool_call>', "Sure: a < b, and <b>bold</b>.", [("f", '{"k": "v"}')]),
    # llama3_json
    ("llama3_json", '{"name": "get_weather", "parameters": {"location": "Paris"}}', None,
     [("get_weather", '{"location": "Paris"}')]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"location": '
     '"Paris"}}', None, [("get_weather", '{"location": "Paris"}')]),
    ("llama3_json", '\n\n{"type": "function", "name": "search", "parameters": {"query": '
     '"caf\\u00e9 \\"best\\""}}', None, [("search", '{"query": "caf\\u00e9 \\"best\\""}')]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": '
     f'{TRICKY}}};{{"name": "c", "parameters": {{}}}}', None,
     [("a", '{"x": 1}'), ("b", TRICKY), ("c", "{}")]),
    ("llama3_json", '<|python_tag|> {"name": "now"}', None, [("now", "{}")]),
    # mistral
    ("mistral", '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": '
     '"Paris, France", "format": "celsius"}}]', None,
     [("get_current_weather", '{"location": "Paris, France", "format": "celsius"}')]),
    ("mistral", 'Let me check both.\n[TOOL_CALLS][{"name": "a", "arguments": {"x": "]"}}, '
     f'{{"name": "b", "arguments": {TRICKY}, "id": "a1B2c3D4e"}}]', "Let me check both.",
     [("a", '{"x": "]"}'), ("b", TRICKY)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("mistral", 'On it. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]run.sql-2'
     f"[ARGS]{TRICKY}[TOOL_CALLS]noop[ARGS]{{}}", "On it.",
     [("get_weather", '{"city": "Paris"}'), ("run.sql-2", TRICKY), ("noop", "{}")]),
    # deepseek_v3
    ("deepseek_v3", f"{CALLS_BEGIN}{ds_v3('get_weather', WEATHER)}{CALLS_END}", None,
     [("get_weather", WEATHER)]),
    ("deepseek_v3", f"I'll call two tools.\n\n{CALLS_BEGIN}{ds_v3('get_weather', WEATHER)}\n"
     f"{ds_v3('run_sql', TRICKY)}{CALLS_END}", "I'll call two tools.",
     [("get_weather", WEATHER), ("run_sql", TRICKY)]),
    ("deepseek_v3", f"{CALLS_BEGIN}{ds_v31('get_weather', WEATHER)}"
     f"{ds_v31('noop', '{}')}{CALLS_END}", None,
     [("get_weather", WEATHER), ("noop", "{}")]),
    ("deepseek_v3", f"Calling.{CALLS_BEGIN}{ds_v31('function', TRICKY)}", "Calling.",
     [("function", TRICKY)]),  # V3.1 calling a function named "function"; calls_end cut off
]


def feed_all(parser_name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Streams ``pieces`` (final=True on the last) and checks each call's deltas: its name
    exactly once, in its first delta, and calls in order."""
    stream = get_parser(parser_name).stream()
    content: list[str] = []
    calls: list[list[str]] = []
    for k, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=k == len(pieces) - 1)
        content.append(text)
        for d in deltas:
            assert isinstance(d, CallDelta)
            if d.name is not None:
                assert d.index == len(calls), "a call is named once, in output order"
                calls.append([d.name, d.arguments])
            else:
                assert d.index == len(calls) - 1, "arguments come after their call's name"
                assert d.arguments
                calls[d.index][1] += d.arguments
    return "".join(content), [(name, args) for name, args in calls]


def splits(text: str, seed: int = 0) -> list[list[str]]:
    """Ways to cut ``text`` into deltas: whole, char by char, seeded random sizes, random
    sizes with empty deltas and an empty final delta."""
    rng = random.Random(seed)
    out = [[text], list(text) or [""]]
    for top in (3, 8, 40):
        cuts, at = [], 0
        while at < len(text):
            size = rng.randint(1, top)
            cuts.append(text[at:at + size])
            at += size
        out.append(cuts or [""])
    cuts, at = [], 0
    while at < len(text):
        size = rng.randint(0, 5)
        cuts.append(text[at:at + size])
        at += size
    out.append([*cuts, ""])
    return out


def expected_parsed(content: str | None, calls: list[tuple[str, str]]) -> Parsed:
    return Parsed(content, [ParsedCall(name, args) for name, args in calls])


@pytest.mark.parametrize("parser, text, content, calls", RECORDED)
def test_recorded_outputs_parse(parser: str, text: str, content: str | None,
                                calls: list[tuple[str, str]]) -> None:
    assert get_parser(parser).parse(text) == expected_parsed(content, calls)
    for _, args in calls:
        assert isinstance(json.loads(args), dict)


@pytest.mark.parametrize("parser, text, content, calls", RECORDED)
def test_recorded_outputs_stream_as_parsed(parser: str, text: str, content: str | None,
                                           calls: list[tuple[str, str]]) -> None:
    for seed, pieces in enumerate(splits(text, seed=len(text))):
        assert "".join(pieces) == text
        assert feed_all(parser, pieces) == (content or "", calls), (seed, pieces[:10])


@pytest.mark.parametrize("parser, text", [(p, t) for p, t, _, _ in RECORDED])
def test_outputs_cut_anywhere(parser: str, text: str) -> None:
    """An output cut at any point (max_tokens): read whole, it is either still tool calls
    (and streams the same) or all content; a stream that began no call then gave it all as
    content too."""
    rng = random.Random(len(text))
    for end in range(len(text) + 1):
        cut = text[:end]
        parsed = get_parser(parser).parse(cut)
        content, calls = feed_all(parser, splits(cut, seed=end)[rng.randrange(6)])
        if parsed.calls:
            assert (content, calls) == (parsed.content or "", [
                (c.name, c.arguments) for c in parsed.calls]), cut
        else:
            assert parsed.content == (cut if cut.strip() else None)
            if not calls:
                assert content == (parsed.content or ""), cut


CONTENT_ONLY = [
    "The weather in Paris is sunny, 22°C.",
    "  Leading and trailing whitespace stay.  \n",
    "Mentions of markers that are not calls: <tool_ [TOOL_ <｜tool▁ and a < b > c.",
    "Ends in a partial marker <tool_ca",
    "Ends in a partial marker [TOOL_CA",
    "Ends in a partial marker <｜tool▁calls",
    "<|pyth",
    "{ is not a call in text",
]


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("text", CONTENT_ONLY)
def test_content_only_outputs(parser: str, text: str) -> None:
    if parser == "llama3_json" and text.startswith("{"):
        pytest.skip("a leading { is read as a call (a malformed one here)")
    assert get_parser(parser).parse(text) == Parsed(text, [])
    for pieces in splits(text, seed=7):
        assert feed_all(parser, pieces) == (text, [])


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("text", ["", " ", "\n\n  \t"])
def test_whitespace_only_output_has_no_content(parser: str, text: str) -> None:
    assert get_parser(parser).parse(text) == Parsed(None, [])
    for pieces in splits(text):
        assert feed_all(parser, pieces) == ("", [])


# Not tool-call text after all; the failure is in the first call, so nothing but (perhaps)
# its name went out before, and the streamed content adds up to the whole text.
MALFORMED_FIRST = [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "argu'),  # cut by length
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}, "extra": 1}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "name": "g"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "parameters": {}, "arguments": {}}\n</tool_call>'),
    ("hermes", "<tool_call>\nget_weather(city='Paris')\n</tool_call>"),
    ("hermes", "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}} junk</tool_call>'),
    ("hermes", "Here is the tag: <tool_call> and more prose."),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_cal'),  # cut in the tag
    ("hermes", "<tool_call>"),
    ("llama3_json", '{"name": "get_weather", "parameters": {"location": "Par'),
    ("llama3_json", '{"answer": 42, "name": "x"}'),  # JSON mode, not a call
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather in Paris")'),
    ("llama3_json", '  {"name": "f", "parameters": {"a": 1} oops'),
    ("llama3_json", '{"name": "f", "parameters": 5}'),
    ("mistral", "[TOOL_CALLS][]"),
    ("mistral", '[TOOL_CALLS] {"name": "f", "arguments": {}}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": '),
    ("mistral", "[TOOL_CALLS]get weather[ARGS]{}"),
    ("mistral", "[TOOL_CALLS]get_weather[ARG]{}"),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par'),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]"),
    ("mistral", "Prose.[TOOL_CALLS]"),
    ("deepseek_v3", f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n"
     '{"location": "Pa'),
    ("deepseek_v3", f'{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n{{"a": 1}}'
     f"{CALL_END}{CALLS_END}"),  # V3 without its code fence
    ("deepseek_v3", f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"a": 1}}{CALLS_END}'),
    ("deepseek_v3", f"{CALLS_BEGIN}{CALL_BEGIN}{SEP}{{}}{CALL_END}{CALLS_END}"),  # no name
    ("deepseek_v3", f"{CALLS_BEGIN}{CALLS_END}"),
    ("deepseek_v3", f"Text {CALLS_BEGIN}{CALL_BEGIN}get_weather"),
]

# Malformed after a whole call: the stream already sent that call, so only the rest comes
# as content; parse still gives the whole text and no calls.
MALFORMED_LATER = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nNow I wait.',
     "\nNow I wait."),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>\n<tool_call>{"name": "g", "argu',
     '\n<tool_call>{"name": "g", "argu'),
    ("llama3_json", '{"name": "a", "parameters": {}} and some text', " and some text"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}', ""),
    ("mistral", "[TOOL_CALLS]f[ARGS]{} trailing", " trailing"),
    ("deepseek_v3", f"{CALLS_BEGIN}{ds_v31('f', '{}')}{CALLS_END} after", f"{CALLS_END} after"),
]


@pytest.mark.parametrize("parser, text", MALFORMED_FIRST)
def test_malformed_output_is_content(parser: str, text: str) -> None:
    assert get_parser(parser).parse(text) == Parsed(text, [])
    for pieces in splits(text, seed=3):
        content, calls = feed_all(parser, pieces)
        assert content == text, pieces[:10]
        assert len(calls) <= 1  # the failing call may have begun; no other did


@pytest.mark.parametrize("parser, text, rest", MALFORMED_LATER)
def test_malformed_after_a_call(parser: str, text: str, rest: str) -> None:
    assert get_parser(parser).parse(text) == Parsed(text, [])
    for pieces in splits(text, seed=5):
        content, calls = feed_all(parser, pieces)
        assert content == rest
        assert [name for name, _ in calls][:1] in (["f"], ["a"])


def test_content_streams_before_the_call() -> None:
    stream = HermesParser().stream()
    assert stream.feed("Let me check the ") == ("Let me check the", [])  # " " held
    assert stream.feed("weather. <tool_") == (" weather.", [])  # " <tool_" may be a call
    assert stream.feed("call>\n{") == ("", [])
    assert stream.feed('"name": "get_wea') == ("", [])  # a name goes out whole
    assert stream.feed('ther", "arguments": {"city": "Pa') == (
        "", [CallDelta(0, "get_weather", '{"city": "Pa')])
    assert stream.feed('ris"}}\n</tool_call>') == ("", [CallDelta(0, None, 'ris"}')])
    assert stream.feed("", final=True) == ("", [])


def test_partial_marker_that_is_not_one_is_released() -> None:
    stream = HermesParser().stream()
    assert stream.feed("a <tool_") == ("a", [])
    assert stream.feed("box> b") == (" <tool_box> b", [])
    assert stream.feed("", final=True) == ("", [])


def test_llama_leading_whitespace_waits_for_the_first_character() -> None:
    stream = get_parser("llama3_json").stream()
    assert stream.feed("\n  ") == ("", [])
    assert stream.feed("Hello") == ("\n  Hello", [])
    assert stream.feed(" there", final=True) == (" there", [])
    stream = get_parser("llama3_json").stream()
    assert stream.feed("\n<|python") == ("", [])
    assert stream.feed('_tag|>{"name": "f", "parameters": {"a"') == (
        "", [CallDelta(0, "f", '{"a"')])


def test_arguments_before_the_name_are_held() -> None:
    stream = HermesParser().stream()
    assert stream.feed('<tool_call>{"arguments": {"a": [1, ') == ("", [])
    assert stream.feed('2]}, "name": "f') == ("", [])
    assert stream.feed('"') == ("", [CallDelta(0, "f", '{"a": [1, 2]}')])


def test_string_arguments_go_out_decoded_once_whole() -> None:
    stream = HermesParser().stream()
    assert stream.feed('<tool_call>{"name": "f", "arguments": "{\\"a\\"') == (
        "", [CallDelta(0, "f", "")])
    assert stream.feed(': \\"}\\"}') == ("", [])
    assert stream.feed('"}</tool_call>', final=True) == ("", [CallDelta(0, None, '{"a": "}"}')])


def test_deepseek_v3_streams_arguments_inside_the_fence() -> None:
    stream = DeepSeekV3Parser().stream()
    assert stream.feed(f"Ok{CALLS_BEGIN[:5]}") == ("Ok", [])
    assert stream.feed(f"{CALLS_BEGIN[5:]}{CALL_BEGIN}function{SEP}get_") == ("", [])
    assert stream.feed('weather\n```json\n{"city":') == (
        "", [CallDelta(0, "get_weather", '{"city":')])
    assert stream.feed(' "Paris"}\n```') == ("", [CallDelta(0, None, ' "Paris"}')])
    assert stream.feed(f"{CALL_END}{CALLS_END}", final=True) == ("", [])


def test_mistral_required_mode_feeds_the_marker_first() -> None:
    """tool_choice "required" constrains the output to the bare array and reads it as
    mistral's: the stream gets the marker before any output."""
    parser = get_parser("mistral")
    body = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "noop", ' \
           '"arguments": {}}]'
    stream = parser.stream()
    assert stream.feed("[TOOL_CALLS]") == ("", [])
    content, calls = "", []
    for ch in body:
        text, deltas = stream.feed(ch)
        content += text
        calls += deltas
    text, deltas = stream.feed("", final=True)
    assert content + text == ""
    assert [d.name for d in calls + deltas if d.name] == ["get_weather", "noop"]
    assert parser.parse("[TOOL_CALLS]" + body).calls[1] == ParsedCall("noop", "{}")


def test_feed_after_final_is_an_error() -> None:
    stream = HermesParser().stream()
    stream.feed("done", final=True)
    with pytest.raises(RuntimeError):
        stream.feed("more")


def test_long_arguments_stream_in_linear_time() -> None:
    """Each delta is looked at once: the text held between feeds stays a few characters
    however long the arguments grow."""
    value = ("x{[\\\"é" * 4000)
    text = ('<tool_call>\n{"name": "write_file", "arguments": {"path": "a.txt", "body": "'
            + value + '"}}\n</tool_call>')
    stream = HermesParser().stream()
    rng = random.Random(1)
    at, args, began = 0, [], time.perf_counter()
    while at < len(text):
        size = rng.randint(1, 3)
        _, deltas = stream.feed(text[at:at + size], final=at + size >= len(text))
        at += size
        args += [d.arguments for d in deltas]
        assert len(stream._buf) <= len("</tool_call>")  # white-box: nothing re-scanned
    assert time.perf_counter() - began < 3.0
    assert "".join(args) == '{"path": "a.txt", "body": "' + value + '"}'


# -- generated outputs -----------------------------------------------------------------------

JSON_LEAF = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=12)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=4)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
CALLS = st.lists(st.tuples(NAMES, ARGS, st.booleans(), st.sampled_from([None, 2])),
                 min_size=1, max_size=3)
CONTENT = st.text(st.sampled_from(list("ab é☕<>[]{}\"\\|_\n\t")), max_size=24)
FORMATS = ["hermes", "llama3_json", "mistral_array", "mistral_v11", "deepseek_v3",
           "deepseek_v31"]


def render(fmt: str, content: str, calls: list[tuple[str, str]]) -> str:
    if fmt == "hermes":
        blocks = [f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>'
                  for n, a in calls]
        return content + "\n" + "\n".join(blocks)
    if fmt == "llama3_json":
        return "; ".join(f'{{"name": {json.dumps(n)}, "parameters": {a}}}' for n, a in calls)
    if fmt == "mistral_array":
        items = ", ".join(f'{{"name": {json.dumps(n)}, "arguments": {a}}}' for n, a in calls)
        return f"{content}[TOOL_CALLS] [{items}]"
    if fmt == "mistral_v11":
        return content + "".join(f"[TOOL_CALLS]{n}[ARGS]{a}" for n, a in calls)
    call = ds_v3 if fmt == "deepseek_v3" else ds_v31
    return content + CALLS_BEGIN + "".join(call(n, a) for n, a in calls) + CALLS_END


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(content=CONTENT, calls=CALLS, seed=st.integers(0, 2**32))
def test_generated_outputs_stream_as_parsed(fmt: str, content: str, calls: list,
                                            seed: int) -> None:
    if fmt == "llama3_json":
        content = ""
    written = [(n, json.dumps(a, ensure_ascii=ascii_, indent=indent))
               for n, a, ascii_, indent in calls]
    text = render(fmt, content, written)
    parser = fmt.split("_")[0] if fmt.startswith(("mistral", "deepseek")) else fmt
    parser = {"deepseek": "deepseek_v3"}.get(parser, parser)
    parsed = get_parser(parser).parse(text)
    assert parsed == expected_parsed(content.rstrip() or None, written)
    assert [json.loads(c.arguments) for c in parsed.calls] == [a for _, a, _, _ in calls]
    rng, cuts, at = random.Random(seed), [], 0
    while at < len(text):
        size = rng.choice([1, 1, 2, 3, 7, 20])
        cuts.append(text[at:at + size])
        at += size
    assert feed_all(parser, cuts) == (parsed.content or "", written)


PIECES = ["<tool_call>", "</tool_call>", "\n", " ", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
          CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, "function", "```json", "```",
          '{"name": "f", ', '"arguments": ', '"parameters": ', '{"a": [1, "}"]}', "{}", "{",
          "}", "[", "]", '"', "\\", ",", ";", ":", "null", "f", "x", "é"]


@pytest.mark.parametrize("parser", sorted(PARSERS))
@settings(max_examples=150, deadline=None, database=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=14),
       seed=st.integers(0, 2**32))
def test_marker_soup_never_breaks_the_contract(parser: str, pieces: list[str],
                                               seed: int) -> None:
    """Text made of markers and JSON bits: parse never raises, and streams agree with it."""
    text = "".join(pieces)
    parsed = get_parser(parser).parse(text)
    rng, cuts, at = random.Random(seed), [], 0
    while at < len(text):
        size = rng.choice([1, 2, 5, 30])
        cuts.append(text[at:at + size])
        at += size
    content, calls = feed_all(parser, cuts or [""])
    if parsed.calls:
        assert (content, calls) == (parsed.content or "", [
            (c.name, c.arguments) for c in parsed.calls])
    else:
        assert parsed.content == (text if text.strip() else None)
        if not calls:
            assert content == (parsed.content or "")


# -- names and templates --------------------------------------------------------------------

def test_get_parser_names() -> None:
    assert set(PARSERS) == {"hermes", "qwen", "llama3_json", "mistral", "deepseek_v3"}
    assert get_parser("qwen").name == "hermes"
    assert get_parser("Llama3-JSON").name == "llama3_json"
    assert get_parser(" deepseek-v3 ").name == "deepseek_v3"
    for name, cls in PARSERS.items():
        assert isinstance(get_parser(name), cls)
    with pytest.raises(ValueError, match="hermes, qwen, llama3_json, mistral, deepseek_v3"):
        get_parser("pythonic")
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("")


QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\n<tools>{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}</tools>\\n\\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags"
)
LLAMA_TEMPLATE = (
    "{%- if builtin_tools is defined or tools is not none %}{{- 'Environment: ipython\\n' }}"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}.{%- elif message.role == 'ipython' %}"
)
LLAMA_PYTHON_TAG_TEMPLATE = "{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
MISTRAL_TEMPLATE = ("{%- elif message.tool_calls is defined %}{{- '[TOOL_CALLS]' }}"
                    "{{- tool_call.function.name + '[ARGS]' + arguments }}")
DEEPSEEK_TEMPLATE = ("{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
                     "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']}}")


@pytest.mark.parametrize("template, expected", [
    (QWEN_TEMPLATE, "hermes"),
    (LLAMA_TEMPLATE, "llama3_json"),
    (LLAMA_PYTHON_TAG_TEMPLATE, "llama3_json"),
    (MISTRAL_TEMPLATE, "mistral"),
    (DEEPSEEK_TEMPLATE, "deepseek_v3"),
    ("{% for message in messages %}{{ message.content }}{% endfor %}", None),
    ("tool calls begin (ascii spaces, not U+2581)", None),
    ("role ipython without the arguments key", None),
    ("", None),
    (None, None),
])
def test_detect_parser(template: str | None, expected: str | None) -> None:
    assert detect_parser(template) == expected
    if expected is not None:
        get_parser(expected)
