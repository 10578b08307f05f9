"""Model loading: HF directories (config.json + safetensors), GGUF import, the demo model.

Submodules import torch, safetensors or gguf; they are loaded on first use so that
`import xllm.loader` (and the tokenizer, which reads generation_config) stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .generation_config import GenerationConfig

if TYPE_CHECKING:
    from .demo import demo_model_dir
    from .gguf_import import convert_gguf_to_hf
    from .hf import iter_weights

__all__ = [
    "GenerationConfig",
    "convert_gguf_to_hf",
    "demo_model_dir",
    "iter_weights",
    "resolve_model",
]

_LAZY = {
    "iter_weights": ".hf",
    "convert_gguf_to_hf": ".gguf_import",
    "demo_model_dir": ".demo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_model(name_or_path: str | Path) -> Path:
    """The local HF model directory for `name_or_path`.

    "demo" is SmolLM2-135M-Instruct (fetched and converted on first use); a directory must
    hold config.json. Anything else is refused: this machine reaches no model hub.
    """
    if isinstance(name_or_path, str) and name_or_path.strip() == "demo":
        from .demo import demo_model_dir

        return demo_model_dir()
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(f"model must be 'demo' or a model directory path, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json; pass a Hugging Face model "
                f"directory (config.json, *.safetensors, tokenizer.json) or 'demo'"
            )
        return path
    if path.is_file():
        hint = (
            ' Convert a .gguf first: python -c "from xllm.loader.gguf_import import '
            f"convert_gguf_to_hf; convert_gguf_to_hf('{path}', 'OUT_DIR')\""
            if path.suffix == ".gguf"
            else ""
        )
        raise ValueError(f"model {path} is a file, not a model directory.{hint}")
    raise ValueError(
        f"model {str(name_or_path)!r} is not a local directory, and model hubs are not "
        f"reachable from xllm: pass a local Hugging Face model directory (config.json, "
        f"*.safetensors, tokenizer.json) or 'demo' for SmolLM2-135M-Instruct"
    )
