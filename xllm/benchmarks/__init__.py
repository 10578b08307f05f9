"""Benchmarks that ship with the package (so ``xllm bench ...`` works from an install);
the repository's ``bench/`` modules are thin entry points onto them."""
