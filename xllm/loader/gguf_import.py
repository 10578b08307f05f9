"""Importing a llama.cpp GGUF file as a Hugging Face model directory.

The `gguf` package reads the file and dequantizes each tensor to fp32; this module maps
llama.cpp's tensor names to HF's, undoes the Q/K row permutation llama.cpp's converter
applies to llama-architecture rotary weights, and writes config.json, model.safetensors
(fp32: dequantized Q4/Q8 values are not exactly representable in bf16), tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json. Q4_1 and Q8_0
weights are also kept as their blocks, repacked, in `xllm_blocks/blocks.safetensors`, and
Q4_0 and Q4_K weights as Q4_1 blocks holding the same values (see xllm.ops.blocks): the
engine can run on them, decoding them exactly to the same fp32 values on the fly, with a
sixth of the memory traffic. Other types (Q5_x, Q6_K, ...) run from the dense weights. The
directory is built under a temporary name next to `out_dir` and renamed into place, so a
reader never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

# gguf general.architecture -> HF architecture. llama.cpp also names Mistral "llama".
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Bumped whenever the output of the conversion changes, so caches keyed on it refresh.
CONVERTER_VERSION = 3  # 2: keeps Q4_1/Q8_0 blocks beside the dense weights; 3: Q4_0, Q4_K too
BLOCKS_FILE = "xllm_blocks/blocks.safetensors"

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a llama.cpp tensor (`blk.3.attn_q.weight` -> `model.layers.3...`)."""
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    if gguf_name.startswith("rope_freqs"):
        raise ValueError(
            "GGUF tensor 'rope_freqs' (llama3-style rope frequency factors) is not supported by "
            "the importer; use the model's Hugging Face release instead"
        )
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to xllm")


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for q_proj/k_proj rows (weights or biases).

    HF stores each head's rotary pairs as (first half, second half) of the head; llama.cpp
    interleaves them, writing rows as reshape(n_head, 2, head_dim/2) -> swap(1, 2). This
    swaps them back.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows over {n_head} heads: not a multiple")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _open_reader(path: Path) -> Any:
    """A gguf.GGUFReader that parses metadata about twice as fast.

    GGUFReader slices its np.memmap once per metadata element (~100k times for a vocabulary),
    and each memmap slice pays for memmap.__array_finalize__; slicing a plain ndarray view of
    the same mapping returns the same bytes without that cost.
    """
    from gguf.gguf_reader import GGUFReader

    class _Reader(GGUFReader):  # type: ignore[misc, valid-type]
        def _get(
            self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
        ) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return _Reader(str(path))


def _field_value(field: Any) -> Any:
    """A ReaderField's value as Python data (str, int, float, bool or a list of them)."""
    from gguf import GGUFValueType

    def one(part: np.ndarray, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else None
        return [one(field.parts[i], sub) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def read_metadata(reader: Any) -> dict[str, Any]:
    return {name: _field_value(f) for name, f in reader.fields.items() if f.types}


def _hf_config(meta: dict[str, Any], tensor_names: set[str], vocab: int) -> dict[str, Any]:
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}, needed for config.json")
        if isinstance(value, list):
            raise ValueError(f"GGUF {arch}.{key} varies per layer; such models are not supported")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError(f"GGUF {arch}.attention.head_count_kv varies per layer; not supported")
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(get("vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        cfg["mlp_bias"] = False
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling == "yarn":
        cfg["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(need("rope.scaling.factor")),
            "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
        }
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type {scaling!r} is not supported")
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf_key] = int(value)
    return cfg


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Converts `gguf_path` into a Hugging Face model directory at `out_dir`; returns it.

    `out_dir` must not exist yet (or be empty). Raises ValueError for an architecture,
    tokenizer or tensor the importer does not support, naming it.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another out_dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert_into(gguf_path, tmp, progress)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # someone else published first
            raise FileExistsError(f"{out_dir} appeared during the conversion") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _convert_into(gguf_path: Path, out: Path, progress: bool) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    try:
        reader = _open_reader(gguf_path)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = _hf_config(meta, names, len(tokens))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    from .gguf_tokenizer import build_tokenizer

    tokenizer, tok_config = build_tokenizer(meta, config["max_position_embeddings"])

    from xllm.ops.blocks import GGUF_BLOCK_TYPES, dequantize_ref, gguf_tensor_blocks

    tensors: dict[str, np.ndarray] = {}
    blocks: dict[str, np.ndarray] = {}
    block_formats: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc="Converting GGUF", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {t.name!r}: {e}") from e
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"GGUF tensor {t.name!r} holds {values.size} values, shape {shape}")
        values = values.reshape(shape)
        # Only llama's converter permutes q/k; Qwen's keeps HF's row order.
        order = None
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = heads if ".attn_q." in t.name else kv_heads
            values = unpermute_rope_rows(values, n_head)
            order = unpermute_rope_rows(np.arange(shape[0]), n_head)
        tensors[name] = np.ascontiguousarray(values)
        if t.tensor_type.name in GGUF_BLOCK_TYPES and len(shape) == 2:
            packed = gguf_tensor_blocks(np.asarray(t.data), t.tensor_type.name, shape)
            fmt = packed.format
            if order is not None:
                packed = packed.take_rows(order)
            # The blocks must decode to exactly the dense weights written beside them.
            if not np.array_equal(dequantize_ref(packed), tensors[name]):
                raise ValueError(f"GGUF tensor {t.name!r}: its {fmt} blocks do not decode to "
                                 "gguf's dequantized values; the file may be damaged")
            block_formats[name] = fmt
            blocks[f"{name}.qs"] = packed.qs
            blocks[f"{name}.scales"] = packed.scales
            if packed.mins is not None:
                blocks[f"{name}.mins"] = packed.mins
    weights_path = out / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    os.chmod(weights_path, 0o644)  # safetensors creates it owner-only; the cache may be shared
    if blocks:
        blocks_path = out / BLOCKS_FILE
        blocks_path.parent.mkdir()
        save_file(blocks, str(blocks_path), metadata=block_formats)
        os.chmod(blocks_path, 0o644)

    tokenizer.save(str(out / "tokenizer.json"))
    eos_ids = [
        int(meta[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if meta.get(k) is not None
    ]
    gen_config: dict[str, Any] = {}
    if "bos_token_id" in config:
        gen_config["bos_token_id"] = config["bos_token_id"]
    if eos_ids:
        unique = list(dict.fromkeys(eos_ids))
        gen_config["eos_token_id"] = unique[0] if len(unique) == 1 else unique
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        gen_config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    provenance = {
        "converter": "xllm.loader.gguf_import",
        "converter_version": CONVERTER_VERSION,
        "source_file": gguf_path.name,
        "source_sha256": _sha256(gguf_path),
        "general.name": meta.get("general.name"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }
    for file_name, data in (
        ("config.json", config),
        ("tokenizer_config.json", tok_config),
        ("generation_config.json", gen_config),
        ("xllm_gguf_import.json", provenance),
    ):
        (out / file_name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
