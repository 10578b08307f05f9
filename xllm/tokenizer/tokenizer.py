"""Tokenizer: a model directory's tokenizer.json (fast `tokenizers` backend) plus its
tokenizer_config.json (special tokens, BOS/EOS policy, chat template).

Behaves like transformers' fast tokenizer for the same directory: the same ids from
encode, the same text from decode, the same prompt from apply_chat_template. Nothing
mutates the backend after loading, so threads may encode and decode concurrently.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from ..loader.generation_config import GenerationConfig
from .chat_template import render_chat_template

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as "text" or as {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or re-create it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        model_max_length: int | None = None,
    ) -> None:
        self._backend = backend
        self.special_tokens: dict[str, str | None] = {
            key: (special_tokens or {}).get(key) for key in _SPECIAL_KEYS
        }
        # One template, or several by name ("default", "tool_use") as some repos ship.
        self._templates: dict[str, str] = (
            {"default": chat_template}
            if isinstance(chat_template, str)
            else dict(chat_template or {})
        )
        self.model_max_length = model_max_length
        self.bos_token_id: int | None = self._id_of("bos_token")
        self.eos_token_id: int | None = self._id_of("eos_token")
        self.pad_token_id: int | None = self._id_of("pad_token")
        ids = set(eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids: set[int] = ids

    def _id_of(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads tokenizer.json, tokenizer_config.json, chat_template.jinja and the EOS ids of
        generation_config.json / config.json from the model directory `path`."""
        path = Path(path).expanduser()
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; xllm needs the fast (tokenizers) format. "
                f"Save it with transformers' AutoTokenizer(...).save_pretrained(dir)"
            )
        try:
            backend = _Backend.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"{tok_path} could not be loaded: {e}") from e
        cfg_path = path / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        special = {key: _token_text(cfg.get(key)) for key in _SPECIAL_KEYS}

        # transformers rebuilds the post-processor when the config states the BOS/EOS policy
        # (or the file has none), so the same must happen here for identical ids.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            _set_bos_eos(
                backend,
                special["bos_token"] if cfg.get("add_bos_token") else None,
                special["eos_token"] if cfg.get("add_eos_token") else None,
            )

        templates: dict[str, str] = {}
        raw = cfg.get("chat_template")
        if isinstance(raw, list):
            for entry in raw:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    templates[str(entry.get("name", "default"))] = entry["template"]
        elif isinstance(raw, str):
            templates["default"] = raw
        jinja_path = path / "chat_template.jinja"
        if jinja_path.is_file():  # transformers >= 4.50 saves the template here
            templates["default"] = jinja_path.read_text()

        gen = GenerationConfig.from_dir(path)
        max_len = cfg.get("model_max_length")
        return cls(
            backend,
            special_tokens=special,
            chat_template=templates,
            eos_token_ids=gen.eos_token_ids,
            model_max_length=int(max_len) if isinstance(max_len, int) else None,
        )

    @property
    def backend(self) -> _Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @functools.cached_property
    def max_bytes_per_token(self) -> int | None:
        """No token covers more UTF-8 bytes of input text than this (the longest token's
        text, which is never shorter than the bytes it stands for: a byte-level BPE symbol
        or a byte-fallback token is longer); None where a normalizer could shrink the input
        first, and no bound holds. Lets a prompt that cannot fit be refused untokenized."""
        if self._backend.normalizer is not None:
            return None
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return max((len(token.encode("utf-8")) for token in vocab), default=None)

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    @property
    def all_special_ids(self) -> set[int]:
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Encodes many texts at once (the backend spreads them over threads)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")
        encs = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False).

        Encode the result with add_special_tokens=False: the template writes BOS itself.
        """
        source = chat_template
        if source is None:
            source = self._templates.get("tool_use") if tools else None
            source = source or self._templates.get("default")
        if source is None:
            raise ValueError(
                "this model ships no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); pass chat_template=... or send plain prompts"
            )
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=specials,
            tools=tools,
            documents=documents,
            **kwargs,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """apply_chat_template then encode, without adding special tokens a second time."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(prompt, add_special_tokens=False)


def _set_bos_eos(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """Post-processor adding BOS/EOS around each sequence, as transformers builds it."""
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    single = " ".join(
        ([f"{bos}:0"] if bos_id is not None else [])
        + ["$A:0"]
        + ([f"{eos}:0"] if eos_id is not None else [])
    )
    pair = " ".join(
        [single]
        + ([f"{bos}:1"] if bos_id is not None else [])
        + ["$B:1"]
        + ([f"{eos}:1"] if eos_id is not None else [])
    )
    marks = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if i is not None and t is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict(marks).items())
    )
