"""Model building blocks: linear (plain and merged), RMSNorm, rotary, activations, paged
attention, embeddings; the sampler lives in ``xllm.layers.sampler``."""

from xllm.layers.activation import SiluAndMul
from xllm.layers.attention import PagedAttention
from xllm.layers.embedding import LMHead, VocabEmbedding
from xllm.layers.layernorm import RMSNorm
from xllm.layers.linear import Linear, MergedLinear, copy_checked
from xllm.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq

__all__ = [
    "LMHead",
    "Linear",
    "MergedLinear",
    "PagedAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SiluAndMul",
    "VocabEmbedding",
    "apply_rotary",
    "compute_inv_freq",
    "copy_checked",
]
