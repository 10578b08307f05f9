"""ModelConfig: a decoder-only transformer's architecture, from a Hugging Face config.json.

One dataclass serves the whole Llama family (Llama, Mistral, Qwen2, Qwen3): the
differences are switches (biases, q/k norm, tied embeddings, GQA, rope scaling).
Validated at construction; errors say which field to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_SCALING = ("default", "llama3", "linear", "yarn")

# transformers' config-class defaults for keys a config.json may leave out (None: derived).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
    },
    "MistralForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
    },
    "Qwen2ForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
    },
    "Qwen3ForCausalLM": {
        "head_dim": 128,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
    },
    # Mixture-of-experts: Qwen3-MoE derives head_dim from the heads (no 128 default).
    "Qwen3MoeForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
    },
    "MixtralForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
    },
    # Multi-head latent attention: head_dim is the q.k size (nope + rope), set from the MLA keys.
    "DeepseekV2ForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
    },
    "DeepseekV3ForCausalLM": {
        "head_dim": None,
        "num_key_value_heads": None,
        "max_position_embeddings": 4096,
    },
}
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "DeepseekV2ForCausalLM",
                     "DeepseekV3ForCausalLM")
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def _rope_from_hf(cfg: dict[str, Any], max_position_embeddings: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config.json dialect.

    transformers < 5 writes ``rope_theta`` and ``rope_scaling`` at the top level; 5.x writes one
    ``rope_parameters`` dict holding ``rope_theta`` and the scaling keys. Like transformers'
    ``standardize_rope_params``, the llama3/yarn ``original_max_position_embeddings`` falls back
    to a top-level key of that name, then to ``max_position_embeddings``.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
    # As in transformers, a rope_theta inside rope_parameters wins over a top-level one.
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        if "original_max_position_embeddings" in cfg:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    return float(theta), scaling


def _windows_from_hf(arch: str, cfg: dict[str, Any],
                     layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, the layers it applies to) as transformers reads them: Mistral whenever
    it is set (default 4096), Mixtral whenever it is set (default none), on every layer; Qwen2
    and Qwen3 only with use_sliding_window, on the layers ``layer_types`` marks
    ``sliding_attention``, else on those from ``max_window_layers`` (default 28) on; Qwen3-MoE
    with use_sliding_window, on every layer. Other architectures have no window."""
    if arch == "MistralForCausalLM":
        window = cfg.get("sliding_window", 4096)
    elif arch == "MixtralForCausalLM":
        window = cfg.get("sliding_window")
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
    else:
        window = None
    if window is None:
        return None, ()
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"config.json: sliding_window must be an integer, got {window!r}")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        types = cfg.get("layer_types")
        if types:
            if len(types) != layers:
                raise ValueError(f"config.json: layer_types lists {len(types)} layers, the "
                                 f"model has {layers}")
            chosen = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        else:
            first = int(cfg.get("max_window_layers", 28))
            chosen = tuple(range(first, layers))
    else:
        chosen = tuple(range(layers))
    return (window, chosen) if chosen else (None, ())


def _moe_from_hf(arch: str, cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields as transformers reads them (its config defaults)."""
    if arch == "Qwen3MoeForCausalLM":
        # The Hub's key is num_experts; transformers saves it as num_local_experts.
        experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 128)))
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        sparse = tuple(i for i in range(layers)
                       if i not in dense and experts > 0 and (i + 1) % step == 0)
        return {"num_experts": experts,
                "num_experts_per_tok": int(cfg.get("num_experts_per_tok", 8)),
                "moe_intermediate_size": int(cfg.get("moe_intermediate_size", 768)),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
                "sparse_layers": sparse}
    if arch == "MixtralForCausalLM":
        return {"num_experts": int(cfg.get("num_local_experts", 8)),
                "num_experts_per_tok": int(cfg.get("num_experts_per_tok", 2)),
                "moe_intermediate_size": int(cfg["intermediate_size"]),
                "norm_topk_prob": True, "sparse_layers": tuple(range(layers))}
    if arch in DEEPSEEK_ARCHITECTURES:
        return _deepseek_moe(arch, cfg, layers)
    return {}


def _deepseek_moe(arch: str, cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    """DeepSeek-V2/V3's experts and router. Layers from ``first_k_dense_replace`` on are sparse
    (every ``moe_layer_freq``-th, as DeepSeek's own code reads it; transformers ignores that key
    and every released config sets 1). V2: softmax scores, ``greedy`` or
    ``group_limited_greedy`` (groups ranked by their best score, the rest masked with 0). V3:
    sigmoid scores plus a correction bias for the choice, groups ranked by the sum of their
    best two, the rest masked with -inf. Both renormalize the chosen weights (+1e-20) when
    ``norm_topk_prob`` and scale them by ``routed_scaling_factor``."""
    v3 = arch == "DeepseekV3ForCausalLM"
    experts = int(cfg.get("n_routed_experts", cfg.get("num_local_experts",
                                                        256 if v3 else 64)) or 0)
    first_dense = int(cfg.get("first_k_dense_replace", 3 if v3 else 0) or 0)
    freq = int(cfg.get("moe_layer_freq", 1) or 1)
    sparse = tuple(i for i in range(first_dense, layers) if experts and i % freq == 0)
    if v3:
        scoring, grouped = "sigmoid", True
    else:
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config.json: topk_method {method!r} is not supported for "
                             f"{arch}; supported: 'greedy', 'group_limited_greedy'")
        scoring, grouped = "softmax", method == "group_limited_greedy"
    n_group = int(cfg.get("n_group", 8 if v3 else 1) or 1) if grouped else 1
    topk_group = int(cfg.get("topk_group", 4 if v3 else 1) or 1) if grouped else 1
    top_k = cfg.get("num_experts_per_tok")
    return {"num_experts": experts,
            "num_experts_per_tok": int(8 if v3 and top_k is None else (top_k or 0)),
            "moe_intermediate_size": int(cfg.get("moe_intermediate_size", 2048 if v3 else 1407)),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", v3)),
            "sparse_layers": sparse,
            "n_shared_experts": int(cfg.get("n_shared_experts", 1 if v3 else 2) or 0),
            "routed_scaling_factor": float(cfg.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
            "scoring_func": scoring, "n_group": n_group, "topk_group": topk_group,
            "routing_bias": v3}


def _mla_from_hf(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention's sizes (DeepSeek-V2/V3; transformers' defaults)."""
    if arch not in DEEPSEEK_ARCHITECTURES:
        return {}
    v3 = arch == "DeepseekV3ForCausalLM"
    q_rank = cfg.get("q_lora_rank", 1536)
    return {"kv_lora_rank": int(cfg.get("kv_lora_rank", 512)),
            "q_lora_rank": 0 if q_rank is None else int(q_rank),
            "qk_nope_head_dim": int(cfg.get("qk_nope_head_dim", 128)),
            "qk_rope_head_dim": int(cfg.get("qk_rope_head_dim", 64)),
            "v_head_dim": int(cfg.get("v_head_dim", 128) or 128),
            # V2 rotates interleaved pairs (complex multiplication); V3 when rope_interleave.
            "rope_interleave": bool(cfg.get("rope_interleave", True)) if v3 else True}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # config.json "architectures"[0], the registry key
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF dict with "rope_type" (or "type")
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    # Sliding-window attention: a token at position p attends to keys (p - window, p], on the
    # layers window_layers lists (all of them for Mistral, Mixtral and Qwen3-MoE; Qwen2/3 from
    # layer_types or max_window_layers).
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()
    # Mixture of experts (0 experts: a dense model). Routing: softmax over all experts, the
    # top num_experts_per_tok, renormalized to sum 1 when norm_topk_prob.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts
    # DeepSeek's routing (xllm.layers.moe.RouterSpec) and shared experts (always-on experts of
    # n_shared_experts * moe_intermediate_size beside the routed ones).
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routing_bias: bool = False  # V3's e_score_correction_bias
    # Multi-head latent attention (kv_lora_rank > 0): K and V come from a latent of
    # kv_lora_rank per token plus one shared rope key of qk_rope_head_dim; head_dim is then
    # qk_nope_head_dim + qk_rope_head_dim (the q.k size). q_lora_rank 0: q from one projection.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"  # the checkpoint's dtype as config.json names it
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(
                f"config.json: hidden_act {self.hidden_act!r} is not supported; supported: 'silu'"
            )
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError("config.json: sliding_window must be a positive integer or null, "
                             f"got {self.sliding_window!r}")
        if any(not 0 <= i < self.num_hidden_layers for i in self.window_layers):
            raise ValueError(f"window layers {self.window_layers} outside the model's "
                             f"{self.num_hidden_layers} layers")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"config.json: num_experts_per_tok must be in [1, {self.num_experts}] (the "
                    f"experts), got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ValueError("config.json: the experts' intermediate size must be a "
                                 f"positive integer, got {self.moe_intermediate_size}")
        if self.kv_lora_rank:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"config.json: {name} must be a positive integer, got {value!r}")
            if self.qk_rope_head_dim % 2:
                raise ValueError("config.json: qk_rope_head_dim must be even, got "
                                 f"{self.qk_rope_head_dim}")
            if (self.kv_lora_rank + self.qk_rope_head_dim) % 8:
                raise ValueError(
                    f"config.json: kv_lora_rank + qk_rope_head_dim ({self.kv_lora_rank} + "
                    f"{self.qk_rope_head_dim}) must be a multiple of 8: the latent cache row "
                    "is the attention kernels' head")
        if self.num_experts and self.n_group > 1:
            if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"config.json: n_group ({self.n_group}) must divide n_routed_experts "
                    f"({self.num_experts}) and topk_group ({self.topk_group}) be in [1, "
                    "n_group]")
            group = self.num_experts // self.n_group
            if self.topk_group * group < self.num_experts_per_tok or (
                    self.routing_bias and group < 2):
                raise ValueError(
                    f"config.json: topk_group ({self.topk_group}) groups of {group} experts "
                    f"cannot hold num_experts_per_tok ({self.num_experts_per_tok}) experts"
                    + (" (and V3 ranks groups by their best two)" if group < 2 else ""))
        if self.rope_type not in SUPPORTED_ROPE_SCALING:
            raise ValueError(
                f"config.json: rope_scaling type {self.rope_type!r} is not "
                f"supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def layer_window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window in tokens; 0 for full attention."""
        if self.sliding_window and layer in self.window_layers:
            return self.sliding_window
        return 0

    @property
    def windowed_everywhere(self) -> bool:
        """Every layer slides: keys older than the window are never read again, so their
        blocks can be freed."""
        return bool(self.sliding_window) and len(self.window_layers) == self.num_hidden_layers

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3)."""
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """The rotated size of each head (MLA rotates only its qk_rope_head_dim part)."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    def kv_cache_geometry(self) -> tuple[int, int, int]:
        """(KV heads, head size, tensors per layer) of the paged cache. MLA keeps one row per
        token, its latent then its rope key, read as both K and V (xllm.layers.mla)."""
        if self.mla:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 1
        return self.num_key_value_heads, self.head_dim, 2

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Builds from a parsed config.json; unknown keys are kept in `raw`."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model class")
        arch = archs[0]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            required = {k: cfg[k] for k in ("vocab_size", "intermediate_size", "num_hidden_layers")}
        except KeyError as e:
            raise ValueError(f"config.json is missing the required key {e.args[0]!r}") from None
        eos = cfg.get("eos_token_id")
        eos_list = (
            [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        )
        defaults = _ARCH_DEFAULTS.get(arch, _ARCH_DEFAULTS["LlamaForCausalLM"])
        head_dim = cfg.get("head_dim") or defaults["head_dim"] or hidden // heads
        # HF: an absent key takes the class default, an explicit null means "same as heads".
        kv_heads = cfg.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
        max_pos = int(cfg.get("max_position_embeddings", defaults["max_position_embeddings"]))
        rope_theta, rope_scaling = _rope_from_hf(cfg, max_pos)
        # Which biases exist is fixed per architecture in transformers' modeling code, whatever
        # config.json says: Llama and Qwen3 put attention_bias on q/k/v AND o_proj; Qwen2 always
        # has q/k/v bias and never o_proj bias; Mistral has none; only Llama reads mlp_bias.
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False))
        # Mistral applies sliding_window whenever it is set (default 4096); Qwen2/3 only with
        # use_sliding_window.
        layers = int(required["num_hidden_layers"])
        sliding_window, window_layers = _windows_from_hf(arch, cfg, layers)
        moe = _moe_from_hf(arch, cfg, layers)
        mla = _mla_from_hf(arch, cfg)
        if mla:
            head_dim = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
            kv_heads = heads
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = arch == "DeepseekV2ForCausalLM" and bool(cfg.get("mlp_bias", False))
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise ValueError(f"config.json: quantized checkpoints (quantization_config "
                             f"quant_method {method!r}) are not supported; use the model's "
                             "bf16 or fp32 weights (or a GGUF file)")
        return cls(
            architecture=arch,
            vocab_size=int(required["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(required["intermediate_size"]),
            num_hidden_layers=int(required["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            hidden_act=str(cfg.get("hidden_act", "silu")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=sliding_window,
            window_layers=window_layers,
            **moe,
            **mla,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_list,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            raw=dict(cfg),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf_dict(json.loads(path.read_text()))
