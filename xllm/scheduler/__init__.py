"""The scheduler: requests, KV blocks + prefix cache, and the per-step batching policy.

Pure Python over the native block pool (``xllm.ops.block_pool``); it never imports torch.
See docs/scheduler.md.
"""

from xllm.scheduler.config import SchedulerConfig
from xllm.scheduler.kv_cache_manager import NO_COMPUTED_BLOCKS, ComputedBlocks, KVCacheManager
from xllm.scheduler.output import ScheduledRequest, SchedulerOutput, SchedulerStats
from xllm.scheduler.request import FINISH_REASONS, Request, RequestStatus
from xllm.scheduler.scheduler import Scheduler

__all__ = [
    "FINISH_REASONS",
    "NO_COMPUTED_BLOCKS",
    "ComputedBlocks",
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]
