"""xllm: an LLM inference engine and its cluster service tier."""

__version__ = "0.1.0"
