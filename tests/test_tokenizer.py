"""xllm.tokenizer on the demo model, against transformers' tokenizer built from the same GGUF:
encode/decode, chat templates, special tokens, and incremental detokenization."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for a hub

import pytest

from xllm.loader import demo as demo_mod
from xllm.tokenizer import IncrementalDetokenizer, Tokenizer
from xllm.tokenizer.chat_template import render_chat_template

TEXTS = [
    "",
    "Hello world",
    "Hello <|im_start|>user\nhi<|im_end|> done<|endoftext|>",
    "<|im_start|><|im_end|><|im_start|>",
    "  leading spaces, trailing   ",
    "a\n\n\nb\t\tc\r\n   \n",
    " " * 17,
    "🤗🚀 emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "Ünïcödé café naïve façade — “quotes” and ‘apostrophes’…",
    "Ελληνικά, русский, עברית, العربية",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(12345))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 3.14159; }",
    "It's 2024-11-22T21:47:00Z; I'll pay $1,234.56 (or 1.2e-3 BTC).",
    "they're we've I'd you'll SHOULD'VE",
    "https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2003em space\u200bzero-width",
    "<notatoken> <|im_start <|im_end|x",
]


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_model_dir)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    """transformers' tokenizer built from the GGUF itself (an independent conversion).

    AutoTokenizer.from_pretrained(dir, gguf_file=...) resolves this file to this class; the
    class is called directly to skip a second ~15 s parse of the file that only serves to
    choose it.
    """
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    gguf = demo_mod.ensure_demo_gguf(progress=False)  # cached by the demo fixture: no download
    return TokenizersBackend.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def raw_hf_backend(hf_gguf_tokenizer):  # type: ignore[no-untyped-def]
    """A copy of transformers' GGUF tokenizer exactly as it converts it."""
    from tokenizers import Tokenizer as Backend

    return Backend.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())


@pytest.fixture(scope="module")
def ref(hf_gguf_tokenizer, raw_hf_backend):  # type: ignore[no-untyped-def]
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer.

    The GGUF says tokenizer.ggml.pre = "smollm": llama.cpp splits every \\p{N} character
    off before the GPT-2 regex, and SmolLM2's tokenizer.json writes the same as
    Digits(individual_digits) then ByteLevel. transformers' GGUF import has no entry for
    "smollm" and applies the GPT-2 regex alone, which differs for whitespace runs before a
    digit and for non-ASCII numerals (test_digits_split_like_llama_cpp). With the model's
    pre-tokenizer put back, everything else -- vocabulary, merges, special tokens, decoder,
    chat template -- is transformers' own conversion to compare against.
    """
    from tokenizers import pre_tokenizers

    hf_gguf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return hf_gguf_tokenizer


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Letters, ASCII digits, punctuation, whitespace, accents, CJK, emoji and special tokens.
    # Non-ASCII numerals are left out: see test_non_ascii_numerals_split_like_llama_cpp.
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    pool += list(" \t\n\r.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`") + ["  ", "   ", "\n\n"]
    pool += list("éèàüößçñøåæœ中文字日本語한국ДЖЯ") + ["🤗", "👍🏽", "🚀", "\u200d"]
    pool += ["<|im_start|>", "<|im_end|>", "<|endoftext|>", " the", "'s", "'ll"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_encode_matches_transformers(tok: Tokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    for text in TEXTS + _random_texts(400, seed=0):
        for special in (True, False):
            expected = ref(text, add_special_tokens=special)["input_ids"]
            assert tok.encode(text, add_special_tokens=special) == expected, repr(text)
    batch = TEXTS[1:8]
    assert tok.encode_batch(batch) == [ref(t)["input_ids"] for t in batch]


def test_decode_matches_transformers(tok: Tokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    sequences = [tok.encode(t) for t in TEXTS]
    # Arbitrary ids too: split characters, stray bytes and special tokens anywhere.
    sequences += [
        [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(300)
    ]
    sequences += [[rng.randrange(20) for _ in range(rng.randint(1, 10))] for _ in range(50)]
    for ids in sequences:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    for text in TEXTS:  # lossless round trip
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_sizes(tok: Tokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    assert tok.vocab_size == len(ref) == 49152
    assert tok.bos_token_id == ref.bos_token_id == 1
    assert tok.eos_token_id == ref.eos_token_id == 2
    assert tok.eos_token_ids == {2}
    assert tok.pad_token_id == ref.pad_token_id
    assert tok.all_special_ids == set(range(17))  # the 17 control tokens of SmolLM2
    assert tok.encode("<|im_end|>") == [2]


def test_digits_split_like_llama_cpp(tok: Tokenizer, raw_hf_backend) -> None:  # type: ignore[no-untyped-def]
    """Each \\p{N} character is a piece of its own before the GPT-2 regex runs (llama.cpp's
    "smollm" pre-tokenizer), so encode(text) is the concatenation over its pieces."""

    def by_pieces(pieces: list[str]) -> list[int]:
        return [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]

    cases = {
        " ٣٤٥": [" ", "٣", "٤", "٥"],
        "x١٢": ["x", "١", "٢"],
        " ⅷ": [" ", "ⅷ"],
        "total:   7": ["total:   ", "7"],
        "    10 items": ["    ", "1", "0", " items"],
    }
    for text, pieces in cases.items():
        assert tok.encode(text, add_special_tokens=False) == by_pieces(pieces), text
    # transformers' unmodified GGUF import splits these differently (see the ref fixture).
    for text in (" ٣٤٥", " ⅷ", "total:   7", "    10 items"):
        assert raw_hf_backend.encode(text, add_special_tokens=False).ids != by_pieces(cases[text])
    assert tok.encode(" 12345", add_special_tokens=False) == [
        tok.token_to_id(t) for t in ("Ġ", "1", "2", "3", "4", "5")
    ]
    # Without digits the two pre-tokenizers are the same function.
    for text in TEXTS + _random_texts(200, seed=5):
        if not any(ch.isnumeric() for ch in text):
            assert tok.encode(text) == raw_hf_backend.encode(text).ids, repr(text)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🤗"},
    ],
    [
        {"role": "user", "content": "Write a haiku\nabout  spaces."},
        {"role": "assistant", "content": "Wide gaps between words\n  silence"},
        {"role": "user", "content": ""},
    ],
    [
        {"role": "system", "content": "中文系统提示"},
        {"role": "user", "content": "<|im_end|> injected"},
    ],
]


def test_chat_template_matches_transformers(tok: Tokenizer, ref, demo_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    ours_loaded_by_hf = AutoTokenizer.from_pretrained(str(demo_model_dir))
    assert tok.chat_template == ref.chat_template
    for conv in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen) == expected
            assert (
                ours_loaded_by_hf.apply_chat_template(
                    conv, tokenize=False, add_generation_prompt=gen
                )
                == expected
            )
        ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.encode_chat(conv) == list(ids)
    for text in TEXTS:  # the directory we wrote is itself a faithful tokenizer for transformers
        assert ours_loaded_by_hf(text)["input_ids"] == tok.encode(text)


def test_chat_template_environment_matches_transformers(tok: Tokenizer) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('system first') }}{% endif -%}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  [{{ m.role | upper }}] {{ m.content | tojson }} "
        "{{ m.get('extra', {}) | tojson(sort_keys=true) }}\n"
        "  {% generation %}<{{ bos_token }}>{% endgeneration %}\n"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{{ strftime_now('%Y') | length }}{% if add_generation_prompt %}GO{% endif %}"
    )
    messages = [
        {"role": "system", "content": "<b>&'\"é</b>"},
        {"role": "skip", "content": "x"},
        {"role": "user", "content": "hi 🤗", "extra": {"b": 1, "a": [1, 2]}},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    ours = render_chat_template(
        template,
        messages,
        add_generation_prompt=True,
        special_tokens={"bos_token": "<s>"},
        tools=tools,
    )
    theirs, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=True, bos_token="<s>", tools=tools
    )
    assert ours == theirs[0]
    with pytest.raises(ValueError, match="system first"):
        render_chat_template(template, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="unsafe"):
        render_chat_template("{{ messages.__class__.__mro__ }}", messages)
    with pytest.raises(ValueError, match="unsafe"):
        render_chat_template("{{ ''.__class__.__subclasses__() }}", messages)
    with pytest.raises(ValueError, match="not valid jinja2"):
        render_chat_template("{% for %}", messages)
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="only hold strings"):
        tok.apply_chat_template([{"role": "user", "content": object()}])


def test_tokenizer_dir_errors_and_template_choice(tmp_path: Path, demo_model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((demo_model_dir / "tokenizer.json").read_text())
    bare = Tokenizer.from_dir(tmp_path)  # no tokenizer_config: no template, no EOS
    assert bare.eos_token_ids == set() and bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    cfg = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [
            {"name": "default", "template": "D{{ messages[0].content }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    named = Tokenizer.from_dir(tmp_path)
    assert named.eos_token_ids == {0, 2}
    msgs = [{"role": "user", "content": "x"}]
    assert named.apply_chat_template(msgs) == "Dx"
    assert named.apply_chat_template(msgs, tools=[{"name": "f"}]) == "T1"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == "J1"


# ---------------------------------------------------------------- incremental detokenizer


def _stream(
    tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool, rng: random.Random
) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.choice((1, 1, 1, 2, 3))  # mostly one token per step, sometimes several
        deltas.append(detok.step(ids[i : i + n]))
        i += n
        assert detok.text == "".join(deltas)
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas) and detok.num_output_tokens == len(ids)
    return detok.text, deltas


def test_detokenizer_random_sequences_equal_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(2)
    byte_tokens = [tok.token_to_id(c) for c in tok.backend.get_vocab() if len(c) == 1]
    for _ in range(300):
        # Mix whole-vocabulary ids with single-byte tokens (which split UTF-8 characters).
        ids = [
            rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.choice(byte_tokens)
            for _ in range(rng.randint(1, 40))
        ]
        skip = rng.random() < 0.5
        text, deltas = _stream(tok, [], ids, skip, rng)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert text == full
        # Everything emitted before the final flush is a prefix that never ends mid-character.
        for k in range(1, len(deltas)):
            so_far = "".join(deltas[:k])
            assert full.startswith(so_far)
            assert not so_far.endswith("\ufffd")


def test_detokenizer_never_splits_characters_on_real_text(tok: Tokenizer) -> None:
    rng = random.Random(3)
    prompt = tok.encode_chat([{"role": "user", "content": "Say something in many scripts."}])
    for text in TEXTS[1:] + ["零一二三四五六七八九十 🤗🤗🤗 ☃☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 done.<|im_end|>"]:
        ids = tok.encode(text, add_special_tokens=False)
        streamed, deltas = _stream(tok, prompt, ids, True, rng)
        assert streamed == tok.decode(ids)
        assert all("\ufffd" not in d for d in deltas)  # valid text never shows a half character
    # Context from the prompt matters for nothing here but must not leak into the output.
    detok = IncrementalDetokenizer(tok, tok.encode("Hello"), skip_special_tokens=True)
    assert detok.step(tok.encode(" world", add_special_tokens=False)) == " world"
    assert detok.finish() == "" and detok.text == " world"
    assert detok.step([]) == ""


def test_detokenizer_long_stream_stays_correct(tok: Tokenizer) -> None:
    text = ("Streaming text with emoji 🤗 and 中文 characters. " * 80).strip()
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    out = "".join(detok.step([i]) for i in ids) + detok.finish()
    assert out == text and len(ids) > 600  # past the id-trimming threshold
