"""The Llama family (Llama, Mistral, Qwen2, Qwen3) against transformers on random weights.

For each architecture and its switches (GQA/MQA, tied embeddings, biases, q/k norm,
head_dim != hidden/heads, rope scaling llama3/linear/yarn) a small transformers model is
built with a fixed seed and given O(1)-scale random weights (norm weights and biases
random too, so a switch that is loaded wrongly changes the output), its state_dict is
loaded into ours, and:

- prefill logits match transformers' (fp32) for several prompts run as one batch;
- greedy tokens equal transformers' ``generate(do_sample=False)`` for 32 steps, through
  ``paged_greedy_generate`` below: a small paged-KV generation loop (sequential block
  allocation, chunked prefill, prefills batched with other sequences' decodes).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from xllm.layers.attn_metadata import AttentionMetadata  # noqa: E402
from xllm.models.config import ModelConfig  # noqa: E402
from xllm.models.llama import LlamaForCausalLM, Qwen3ForCausalLM  # noqa: E402
from xllm.models.registry import SUPPORTED_ARCHITECTURES, get_model_class  # noqa: E402
from xllm.ops.kv_cache import allocate_kv_cache, allocate_model_kv_caches  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These models are tiny: one thread is fastest, and immune to a loaded machine (two
    threads contending with other processes for two cores ran 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 384
MAX_NEW = 32


# --------------------------------------------------------------------------------------
# A test-only paged generation loop (the engine's runner replaces it; kept small on purpose)


@dataclass
class _Seq:
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) - self.prompt_len >= self.max_new


def _int32(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Block tables padded with the null block 0."""
    out = torch.zeros((len(rows), max(width, 1)), dtype=torch.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def paged_greedy_generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    block_size: int = 16,
    prefill_chunk: int | None = None,
    kv_dtype: torch.dtype = torch.float32,
) -> list[list[int]]:
    """Greedy continuation of every prompt, all sequences stepped together.

    Each step feeds one token for every sequence whose prompt is in the cache (decodes,
    first) and the next prompt chunk (``prefill_chunk`` tokens; whole prompt if None) of
    every other one. Blocks are handed out 1, 2, 3, ... as sequences need them (block 0
    is the null block), so sequences interleave in the cache.
    """
    cfg = model.config
    seqs = [_Seq(list(p), len(p), max_new_tokens) for p in prompts]
    num_blocks = 1 + sum(math.ceil((len(p) + max_new_tokens) / block_size) for p in prompts)
    caches = allocate_model_kv_caches(cfg, num_blocks, block_size, kv_dtype)
    model.bind_kv_caches(caches)
    next_block = 1
    while not all(s.done for s in seqs):
        decodes = [s for s in seqs if s.num_computed >= s.prompt_len and not s.done]
        prefills = [s for s in seqs if s.num_computed < s.prompt_len]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[_Seq] = []
        query_start = [0]
        for s in decodes + prefills:
            is_prefill = s.num_computed < s.prompt_len
            if is_prefill:
                n = s.prompt_len - s.num_computed
                n = n if prefill_chunk is None else min(n, prefill_chunk)
            else:
                n = 1
            start = s.num_computed
            while len(s.blocks) * block_size < start + n:
                s.blocks.append(next_block)
                next_block += 1
            for p in range(start, start + n):
                ids.append(s.tokens[p])
                positions.append(p)
                slots.append(s.blocks[p // block_size] * block_size + p % block_size)
            if is_prefill:
                query_start.append(query_start[-1] + n)
            s.num_computed += n
            if s.num_computed == len(s.tokens):  # reached its last token: sample
                sample_rows.append(len(ids) - 1)
                sampled.append(s)
        width = max([len(s.blocks) for s in seqs])
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            num_decode_tokens=len(decodes),
            decode_block_tables=_int32([s.blocks for s in decodes], width),
            decode_seq_lens=torch.tensor([s.num_computed for s in decodes], dtype=torch.int32),
            prefill_block_tables=_int32([s.blocks for s in prefills], width),
            prefill_query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            prefill_seq_lens=torch.tensor([s.num_computed for s in prefills], dtype=torch.int32),
            num_prefill_tokens=len(ids) - len(decodes),
        )
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(positions), attn)
            logits = model.compute_logits(hidden[sample_rows])
        assert logits.dtype == torch.float32 and logits.shape == (len(sample_rows), cfg.vocab_size)
        for s, tok in zip(sampled, logits.argmax(-1).tolist(), strict=True):
            s.tokens.append(tok)
    return [s.tokens[s.prompt_len :] for s in seqs]


# --------------------------------------------------------------------------------------
# Random transformers models and our copies

_SMALL = dict(
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (architecture, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-tied-llama3": (
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama-bias-linear": (
        "LlamaForCausalLM",
        dict(
            attention_bias=True,
            mlp_bias=True,
            num_hidden_layers=3,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
    ),
    "llama-mqa-yarn": (
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral": (
        "MistralForCausalLM",
        dict(sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, num_hidden_layers=3)),
    "qwen3-qknorm-headdim": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3-bias-mqa-yarn": (
        "Qwen3ForCausalLM",
        dict(
            head_dim=16,
            attention_bias=True,
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1e6,
                factor=2.0,
                beta_fast=16.0,
                beta_slow=2.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
}


def _hf_classes(arch: str) -> tuple[type, type]:
    prefix = arch.removesuffix("ForCausalLM")
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, arch)


@functools.cache
def hf_model(name: str, native_sizes: bool = False, bf16_values: bool | None = None) -> Any:
    """A transformers model of this variant with O(1)-scale random weights (seeded).

    native_sizes: intermediate_size 128 (a multiple of the native kernels' 32) and, unless
    bf16_values is False, every weight rounded to a bf16 value, so the native stack runs it
    on bf16 or f32 rows exactly.
    """
    if bf16_values is None:
        bf16_values = native_sizes
    arch, overrides = VARIANTS[name]
    config_cls, model_cls = _hf_classes(arch)
    sizes = {"intermediate_size": 128} if native_sizes else {}
    config = config_cls(**{**_SMALL, **overrides, **sizes}, architectures=[arch])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model, torch.Generator().manual_seed(sum(map(ord, name))))
    if bf16_values:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    return model


def hf_from_overrides(arch: str, overrides: dict[str, Any], name: str) -> Any:
    """transformers' ``arch`` on _SMALL plus ``overrides`` (eager attention and experts),
    its weights drawn by ``randomize`` from a seed derived from ``name``."""
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        **{**_SMALL, **overrides}, architectures=[arch])
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # transformers' plain loop, not grouped_mm
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    randomize(model, torch.Generator().manual_seed(sum(map(ord, name))))
    return model


def ours_from_hf(hf: Any, weights: Any = None) -> LlamaForCausalLM:
    """Our model of hf's config, loaded from ``weights`` (default: hf's state_dict)."""
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = get_model_class(config.architecture)(config)
    model.load_weights(weights if weights is not None else hf.state_dict().items())
    return model


def random_prompts(lengths: Sequence[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def greedy_of(hf: Any, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (no EOS stop)."""
    config = transformers.GenerationConfig(max_new_tokens=max_new, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                            generation_config=config)[0, len(p):].tolist() for p in prompts]


def assert_matches_transformers(hf: Any, ours: LlamaForCausalLM,
                                prompts: Sequence[Sequence[int]]) -> None:
    """Prefill logits close to transformers' (fp32), and MAX_NEW greedy tokens identical
    (decodes and 7-token prefill chunks stepped together)."""
    with torch.no_grad():
        for got, p in zip(prefill_logits(ours, prompts), prompts, strict=True):
            torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=1e-4,
                                       rtol=1e-4)
    assert paged_greedy_generate(ours, prompts, MAX_NEW, prefill_chunk=7) == greedy_of(
        hf, prompts, MAX_NEW)


def save_with_tokenizer(hf: Any, out: Path, tokenizer_dir: Path) -> Path:
    """A model directory xllm loads: ``hf``'s weights and config plus the tokenizer files of
    ``tokenizer_dir`` (the demo model's; the tests feed token ids below its vocabulary)."""
    import shutil

    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


def assert_engine_serves(hf: Any, model_dir: Path, demo_model_dir: Path,
                         prompts: Sequence[Sequence[int]],
                         check: Callable[[Any], None] | None = None) -> None:
    """hf saved to ``model_dir`` (with the demo's tokenizer) through the loader and the engine:
    transformers' 12 greedy tokens in fp32; in the CPU's default format most of them.
    ``check(llm)`` runs on each engine before it generates."""
    from xllm import LLM, SamplingParams

    save_with_tokenizer(hf, model_dir, demo_model_dir)
    want = greedy_of(hf, prompts, 12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for options in ({"dtype": "float32"}, {}):
        llm = LLM(str(model_dir), max_model_len=128, kv_cache_memory_gb=0.05, num_threads=1,
                  **options)
        try:
            if check is not None:
                check(llm)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                 use_tqdm=False)]
        finally:
            llm.engine.close()
        if options:
            assert got == want
        else:  # reduced precision: most tokens agree
            agree = sum(a == b for g, w in zip(got, want, strict=True)
                        for a, b in zip(g, w, strict=True))
            assert agree >= 0.75 * sum(map(len, want)), (got, want)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """O(1)-scale random weights: norms near 1, small biases, unit-variance embeddings, and
    weights [..., out, in] scaled so unit-variance inputs give unit-variance outputs (3-D
    expert weights included)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in pname:
                p.copy_(1 + 0.2 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed" in pname:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


@functools.cache
def our_model(name: str) -> LlamaForCausalLM:
    hf = hf_model(name)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = get_model_class(config.architecture)(config)
    model.load_weights(hf.state_dict().items())
    return model


def _prompts(name: str, lengths: Sequence[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1000 + sum(map(ord, name)))
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@functools.cache
def hf_greedy(name: str, prompt: tuple[int, ...], native_sizes: bool = False) -> list[int]:
    hf = hf_model(name, native_sizes)
    ids = torch.tensor([prompt])
    gen_config = transformers.GenerationConfig(
        max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
    return out[0, len(prompt) :].tolist()


# --------------------------------------------------------------------------------------
# Tests against transformers


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_switches_follow_architecture(name: str) -> None:
    arch, overrides = VARIANTS[name]
    hf = hf_model(name)
    cfg = our_model(name).config
    assert cfg.architecture == arch
    hf_attn = hf.model.layers[0].self_attn
    assert cfg.head_dim == hf_attn.head_dim
    assert cfg.kv_size == hf_attn.k_proj.weight.shape[0]
    assert cfg.qk_norm == (arch == "Qwen3ForCausalLM")
    assert cfg.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert cfg.attention_bias == (hf_attn.q_proj.bias is not None)
    assert cfg.o_proj_bias == (hf_attn.o_proj.bias is not None)
    assert cfg.mlp_bias == (hf.model.layers[0].mlp.gate_proj.bias is not None)


def prefill_logits(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    block_size: int = 4,
    kv_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Every position's logits [len(p), vocab] for each prompt, all in one prefill batch."""
    cfg = model.config
    num_blocks = 1 + sum(math.ceil(len(p) / block_size) for p in prompts)
    caches = allocate_model_kv_caches(cfg, num_blocks, block_size, kv_dtype)
    model.bind_kv_caches(caches)
    free = list(range(num_blocks - 1, 0, -1))  # back to front: tables are not the identity
    tables, slots, starts = [], [], [0]
    for p in prompts:
        blocks = [free.pop(0) for _ in range(math.ceil(len(p) / block_size))]
        tables.append(blocks)
        slots += [blocks[i // block_size] * block_size + i % block_size for i in range(len(p))]
        starts.append(starts[-1] + len(p))
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros((0, 1), dtype=torch.int32),
        decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=_int32(tables, max(len(t) for t in tables)),
        prefill_query_start_loc=torch.tensor(starts, dtype=torch.int32),
        prefill_seq_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32),
        num_prefill_tokens=starts[-1],
    )
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, positions, attn))
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), cfg.vocab_size)
    return [logits[starts[i] : starts[i + 1]] for i in range(len(prompts))]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_logits_match_transformers(name: str) -> None:
    """Several prompts as one batch of prefills, every position's logits compared."""
    model, hf = our_model(name), hf_model(name)
    prompts = _prompts(name, [1, 7, 16, 29, 50])
    for ours, p in zip(prefill_logits(model, prompts), prompts, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_weights_and_cache_stay_close_to_fp32() -> None:
    """dtype=bfloat16 (weights, activations, KV cache) runs the same path; its logits sit
    within bf16 rounding of the fp32 model's (seen: ~1% relative), top tokens agree."""
    name = "qwen3-qknorm-headdim"
    hf = hf_model(name)
    model = Qwen3ForCausalLM(our_model(name).config, dtype=torch.bfloat16)
    model.load_weights(hf.state_dict().items())
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    prompts = _prompts(name, [9, 23])
    ours = prefill_logits(model, prompts, kv_dtype=torch.bfloat16)
    ref = prefill_logits(our_model(name), prompts)
    for got, want in zip(ours, ref, strict=True):
        err = float((got - want).norm() / want.norm())
        assert err < 0.03, f"relative error {err:.3g}"
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        assert agree >= 0.9, f"top-1 agreement {agree:.2f}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_transformers_generate(name: str) -> None:
    """Four prompts batched: chunked prefill (chunk 8) beside decodes, block size 4."""
    model = our_model(name)
    prompts = _prompts(name, [3, 12, 21, 37])
    ours = paged_greedy_generate(model, prompts, MAX_NEW, block_size=4, prefill_chunk=8)
    for p, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(name, tuple(p)), f"prompt of {len(p)} tokens"


@pytest.mark.parametrize("name", ["llama-tied-llama3", "qwen2-bias-tied", "qwen3-qknorm-headdim"])
def test_greedy_matches_with_whole_prompts_and_block_16(name: str) -> None:
    """The other path: whole-prompt prefills in one step, then batched decodes, block 16."""
    model = our_model(name)
    prompts = _prompts(name, [5, 17, 30])
    ours = paged_greedy_generate(model, prompts, MAX_NEW, block_size=16)
    for p, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(name, tuple(p)), f"prompt of {len(p)} tokens"


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_native_stack_on_row_weights_matches_transformers(name: str, fmt: str) -> None:
    """Every projection on bf16 or f32 rows through the native kernels, all layers in the
    native decoder stack: the same greedy tokens as transformers, chunked prefill beside
    decodes."""
    hf = hf_model(name, native_sizes=True)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = get_model_class(config.architecture)(config)
    model.load_weights(hf.state_dict().items())
    assert model.attach_rows(fmt) == 4 * config.num_hidden_layers + 1  # + the LM head
    prompts = _prompts(name, [3, 12, 21])
    ours = paged_greedy_generate(model, prompts, MAX_NEW, block_size=4, prefill_chunk=8)
    assert model._stack is not None
    for p, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(name, tuple(p), native_sizes=True), f"prompt of {len(p)} tokens"


def test_single_sequence_chunked_prefill_matches() -> None:
    """One sequence alone, its prompt split into three chunks (13 + 13 + 11)."""
    name = "llama-gqa"
    prompt = _prompts(name, [37])[0]
    ours = paged_greedy_generate(
        our_model(name), [prompt], MAX_NEW, block_size=16, prefill_chunk=13
    )
    assert ours[0] == hf_greedy(name, tuple(prompt))


# --------------------------------------------------------------------------------------
# Loading, registry and binding errors


def _small_config(**overrides: Any) -> ModelConfig:
    cfg = {**_SMALL, "architectures": ["LlamaForCausalLM"], **overrides}
    return ModelConfig.from_hf_dict(cfg)


def test_registry_lists_supported_architectures() -> None:
    assert set(SUPPORTED_ARCHITECTURES) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    }
    for arch in SUPPORTED_ARCHITECTURES:
        assert issubclass(get_model_class(arch), LlamaForCausalLM)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, Mistral"):
        get_model_class("GPT2LMHeadModel")


def test_load_weights_rejects_bad_checkpoints() -> None:
    sd = hf_model("llama-gqa").state_dict()
    model = LlamaForCausalLM(our_model("llama-gqa").config)

    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(16, 64\).*\(32, 64\)"):
        model.load_weights(bad.items())

    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.bias' does not"):
        model.load_weights([*sd.items(), ("model.layers.0.self_attn.q_proj.bias", torch.zeros(64))])

    missing = {k: v for k, v in sd.items() if "up_proj" not in k}
    with pytest.raises(ValueError, match=r"lacks 2 tensor.*layers.0.mlp.up_proj.weight"):
        model.load_weights(missing.items())

    with pytest.raises(ValueError, match="appears twice"):
        model.load_weights([*sd.items(), ("model.norm.weight", sd["model.norm.weight"])])

    tied_sd = dict(hf_model("qwen2-bias-tied").state_dict())
    tied_sd["lm_head.weight"] = torch.zeros(VOCAB + 1, 64)
    tied_model = get_model_class("Qwen2ForCausalLM")(our_model("qwen2-bias-tied").config)
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(385, 64\)"):
        tied_model.load_weights(tied_sd.items())

    # Harmless extras from old checkpoints are skipped; a bf16 checkpoint is widened.
    extra = [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))]
    model.load_weights([*((k, v.bfloat16()) for k, v in sd.items()), *extra])
    assert model.model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(
        model.model.norm.weight, sd["model.norm.weight"].bfloat16().float(), atol=0, rtol=0
    )


def test_fused_projections_hold_checkpoint_tensors() -> None:
    sd = hf_model("qwen2-bias-tied").state_dict()
    model = our_model("qwen2-bias-tied")
    attn = model.model.layers[1].self_attn
    qkv = attn.qkv_proj
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        for pname in ("weight", "bias"):
            hf_t = sd[f"model.layers.1.self_attn.{part}.{pname}"]
            assert torch.equal(qkv.shard(pname, i), hf_t)
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(gate_up[:112], sd["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[112:], sd["model.layers.1.mlp.up_proj.weight"])
    # Tied: the head reads the embedding table itself; state_dict lists it once.
    assert model.lm_head.table is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()


def test_unsupported_settings_are_rejected_and_windows_do_not_cap_context() -> None:
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        LlamaForCausalLM(_small_config(partial_rotary_factor=0.5))
    assert LlamaForCausalLM(_small_config()).max_context_len == 256
    windowed = _small_config(architectures=["MistralForCausalLM"], sliding_window=100)
    assert get_model_class("MistralForCausalLM")(windowed).max_context_len == 256


def test_bind_kv_caches_checks_shapes() -> None:
    model = LlamaForCausalLM(_small_config())
    good = allocate_kv_cache(4, 2, 16, 16)
    with pytest.raises(ValueError, match="has 1 .*2 layers"):
        model.bind_kv_caches([good])
    with pytest.raises(ValueError, match=r"kv_caches\[1\]: key_cache must be .*\[num_blocks, 2"):
        model.bind_kv_caches([good, allocate_kv_cache(4, 4, 16, 16)])
    with pytest.raises(ValueError, match="same shape"):
        model.bind_kv_caches([good, (good[0], torch.zeros(5, 2, 16, 16))])
    fresh = LlamaForCausalLM(_small_config())
    attn = AttentionMetadata(
        torch.tensor([0]),
        1,
        torch.zeros((1, 1), dtype=torch.int32),
        torch.ones(1, dtype=torch.int32),
        torch.zeros((0, 1), dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match="bind_kv_caches"):
        fresh(torch.tensor([1]), torch.tensor([0]), attn)


# --------------------------------------------------------------------------------------
# ModelConfig from both config.json dialects and each architecture's defaults


def test_config_reads_transformers4_and_5_rope_keys() -> None:
    v4 = _small_config(
        rope_theta=5e5,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        original_max_position_embeddings=64,
    )
    v5 = _small_config(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    for cfg in (v4, v5):
        assert cfg.rope_theta == 5e5 and cfg.rope_type == "llama3"
        assert cfg.rope_scaling is not None
        assert cfg.rope_scaling["original_max_position_embeddings"] == 64
    plain = _small_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    yarn = _small_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    assert yarn.rope_scaling["original_max_position_embeddings"] == 256  # max_position
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        _small_config(rope_scaling={"type": "dynamic", "factor": 2.0})


def test_config_architecture_defaults() -> None:
    """Keys a config.json leaves out take transformers' per-class defaults."""
    base = {k: v for k, v in _SMALL.items() if k != "max_position_embeddings"}
    del base["num_key_value_heads"]
    base.update(num_attention_heads=32, hidden_size=512)

    def parse(arch: str, **extra: Any) -> ModelConfig:
        return ModelConfig.from_hf_dict({**base, "architectures": [arch], **extra})

    qwen3 = parse("Qwen3ForCausalLM")
    assert qwen3.head_dim == 128 and qwen3.qk_norm and qwen3.max_position_embeddings == 32768
    assert qwen3.num_key_value_heads == 32 and not qwen3.attention_bias
    qwen3_bias = parse("Qwen3ForCausalLM", attention_bias=True, num_key_value_heads=None)
    assert qwen3_bias.attention_bias and qwen3_bias.o_proj_bias
    assert qwen3_bias.num_key_value_heads == 32  # explicit null: same as the heads
    qwen2 = parse("Qwen2ForCausalLM", attention_bias=False, mlp_bias=True)
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.mlp_bias
    assert qwen2.head_dim == 16 and qwen2.sliding_window is None
    qwen2_window = parse("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=64,
                         max_window_layers=0)
    assert qwen2_window.sliding_window == 64 and qwen2_window.windowed_everywhere
    mistral = parse("MistralForCausalLM", attention_bias=True)
    assert mistral.sliding_window == 4096 and not mistral.attention_bias
    assert mistral.num_key_value_heads == 8 and mistral.max_position_embeddings == 131072
    assert parse("MistralForCausalLM", sliding_window=None).sliding_window is None
    llama = parse("LlamaForCausalLM", attention_bias=True, mlp_bias=True)
    assert llama.attention_bias and llama.o_proj_bias and llama.mlp_bias
    assert llama.num_key_value_heads == 32 and llama.max_position_embeddings == 2048
