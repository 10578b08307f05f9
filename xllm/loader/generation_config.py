"""GenerationConfig: the stop tokens and sampling defaults a model directory ships.

Read from generation_config.json, falling back to config.json for the token ids (older
checkpoints keep them there). Sampling defaults use SamplingParams' names so the engine can
apply them to fields a user left unset, as vLLM does with `generation_config="auto"`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"

# HF generation_config.json key -> SamplingParams field.
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def token_id_list(value: Any, what: str) -> list[int]:
    """An HF token-id field (absent, one int, or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} must be a token id or a list of token ids, got {value!r}")
        out.append(v)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: list[int] = field(default_factory=list)  # any of them ends a sequence
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # SamplingParams field name -> value, only the ones the checkpoint sets.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationConfig:
        """Reads `path`/generation_config.json; token ids fall back to config.json."""
        path = Path(path)
        gen_path = path / GENERATION_CONFIG_NAME
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        cfg_path = path / "config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}

        def pick(key: str) -> Any:
            return gen[key] if gen.get(key) is not None else cfg.get(key)

        eos = token_id_list(pick("eos_token_id"), "eos_token_id")
        bos = token_id_list(pick("bos_token_id"), "bos_token_id")
        pad = token_id_list(pick("pad_token_id"), "pad_token_id")
        defaults: dict[str, Any] = {}
        for hf_key, ours in _SAMPLING_KEYS.items():
            value = gen.get(hf_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                defaults[ours] = value
        # With do_sample=False HF ignores the distribution settings, so they are no defaults.
        if gen.get("do_sample") is False:
            for key in ("temperature", "top_p", "top_k", "min_p"):
                defaults.pop(key, None)
        return cls(
            eos_token_ids=list(dict.fromkeys(eos)),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
            sampling_defaults=defaults,
            raw=gen,
        )
