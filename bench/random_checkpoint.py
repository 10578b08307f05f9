"""A Hugging Face checkpoint with a real model's shapes and random weights, for benchmarks.

    python -m bench.random_checkpoint --shape llama3.2-1b --out DIR

No model hub is reachable here, so the benchmarks' only real weights are the demo's
(SmolLM2-135M), where per-step overheads weigh more than in the models users serve. This
writes ``config.json``, ``generation_config.json`` and bf16 ``model.safetensors`` (weights
drawn as ``transformers`` initialises them, seeded) with the demo's tokenizer, so every engine
(xllm, vLLM, transformers) loads the directory as it would the real checkpoint. The outputs
are meaningless text; the arithmetic per token is the real model's, but for the vocabulary
(the demo tokenizer's 49152 entries instead of the model's own). ``bench.throughput --model
DIR`` runs its scenarios on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# name -> the architecture's config fields (from the published configs); vocab_size and
# the token ids come from the demo tokenizer.
SHAPES: dict[str, dict] = {
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                         hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write(shape: str, out: Path, seed: int = 0) -> Path:
    """Writes the checkpoint into `out` (created; refused if it holds a model already)."""
    import torch
    import transformers

    from xllm.loader import resolve_model

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model (config.json); choose another --out")
    demo = resolve_model("demo")
    demo_cfg = json.loads((demo / "config.json").read_text())
    fields = dict(SHAPES[shape], vocab_size=demo_cfg["vocab_size"],
                  bos_token_id=demo_cfg["bos_token_id"], eos_token_id=demo_cfg["eos_token_id"],
                  max_position_embeddings=4096, hidden_act="silu", torch_dtype="bfloat16")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in fields.items()
                                                  if k != "architectures"})
    config.architectures = fields["architectures"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, out / name)
    meta = {"random_weights": True, "shape": shape, "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters())}
    (out / "xllm_random_checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.random_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write(args.shape, args.out, args.seed)
    meta = json.loads((out / "xllm_random_checkpoint.json").read_text())
    print(f"# {args.shape}: {meta['parameters'] / 1e9:.2f} B parameters in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
