"""xllm: an LLM inference engine and its cluster service tier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from xllm.config import EngineConfig
    from xllm.engine.llm import LLM
    from xllm.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so `import xllm.scheduler` (torch-free) does not pull in torch through here.
    if name == "LLM":
        from xllm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from xllm.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from xllm.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'xllm' has no attribute {name!r}")
