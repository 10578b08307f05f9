"""Triton kernels for the GPU ops (CUDA; also runnable on CPU tensors under TRITON_INTERPRET=1).

- ``xllm.ops.triton.attention``  paged attention (split-KV decode, tiled prefill/extend)
  and the KV cache write, over the layout in ``xllm.ops.kv_cache``.

Nothing here imports triton until a submodule is imported, so ``is_available()`` is cheap
and safe on machines without it.
"""

from __future__ import annotations

import importlib.util


def is_available() -> bool:
    """Whether the ``triton`` package can be imported (it does not say a GPU is present)."""
    return importlib.util.find_spec("triton") is not None
