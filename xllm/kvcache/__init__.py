"""The KV cache as one store of blocks: the pool's memory mapped on demand, and the tiers
below the pool (see docs/kvcache.md). Torch-free except where it hands the runner views."""

from xllm.kvcache.store import KVStore, KVStoreConfig, KVStoreStats

__all__ = ["KVStore", "KVStoreConfig", "KVStoreStats"]
