"""One Python function per op; each picks its backend (native CPU, Triton, torch reference).

Submodules are imported on demand so that torch-free users (the scheduler uses
the block pool) never pay for torch:

- ``xllm.ops.attention``   paged attention (decode, prefill/extend) and KV cache write
- ``xllm.ops.kv_cache``    the KV cache layout, defined once
- ``xllm.ops.block_pool``  KV block pool with prefix cache (native and pure Python)
- ``xllm.ops.queue``       bounded lock-free MPMC queue
- ``xllm.ops.vmm``         VMM page pool (reserve a range, map pages on demand)
- ``xllm.ops.allreduce``   shared-memory allreduce among local processes
"""
