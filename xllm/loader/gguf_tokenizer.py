"""Rebuilding a `tokenizers` tokenizer from a GGUF file's tokenizer metadata.

A GGUF stores no tokenizer.json, only llama.cpp's description of the vocabulary:
`tokenizer.ggml.model` (the algorithm), `tokens`, `merges`, `token_type`, the special token
ids, and `tokenizer.ggml.pre` (which pre-tokenizer regex the model was trained with). This
module turns a byte-level BPE description ("gpt2", used by SmolLM, Llama 3, Qwen, ...) into
the equivalent Hugging Face tokenizer.json plus tokenizer_config.json.

The pre-tokenizer follows llama.cpp's table for each `pre` name (llama-vocab.cpp), written
the way the models' own tokenizer.json files spell it; an unknown name is refused rather
than guessed, because a wrong split silently changes the token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (llama_token_type / gguf TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _starcoder() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: "\p{N}" then the GPT-2 regex, i.e. every digit on its own. This is how
    # SmolLM/StarCoder's tokenizer.json writes it: Digits(individual) then ByteLevel.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# tokenizer.ggml.pre -> pre-tokenizer, grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), _gpt2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _starcoder,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"),
        _split_then_bytes(_LLAMA3_SPLIT),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _split_then_bytes(_QWEN2_SPLIT)),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(
    meta: dict[str, Any], context_length: int | None
) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config.json contents) from GGUF metadata (key -> decoded value)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2', used by "
            f"SmolLM, Llama 3, Qwen2/3, ...) can be rebuilt. Supply a Hugging Face directory "
            f"with tokenizer.json instead."
        )
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre {pre!r} is not known; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges_raw: Sequence[str] = meta.get("tokenizer.ggml.merges") or []
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    # A byte-level vocabulary is written in the byte alphabet; a token that is not (a
    # mislabelled literal) is respelled so BPE can still reach it from its bytes.
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        key = token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode())
        if key in vocab:
            raise ValueError(
                f"GGUF vocabulary spells token {index} and token {vocab[key]} the same ({key!r})"
            )
        vocab[key] = index
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>, ...) are special: matched whole in the text
    # and dropped by decode(skip_special_tokens=True). User-defined ones are matched whole
    # but kept, as llama.cpp does.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_CONTROL and set(t) <= spelled
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_USER_DEFINED and set(t) <= spelled
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token_at(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{key} = {value} is outside the vocabulary")
        return tokens[int(value)]

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(
            ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        )
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        marks = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in sorted(marks)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("unknown_token_id"),
        "pad_token": token_at("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        config["model_max_length"] = int(context_length)
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config
