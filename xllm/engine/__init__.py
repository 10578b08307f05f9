"""LLMEngine (the step loop) and the offline LLM API."""
