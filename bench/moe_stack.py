"""Single-stream decode of a mixture-of-experts model: the native decoder stack (routing and
experts inside it) against the same model on its torch modules, in the CPU's formats.

The model is a random-weight Qwen3-MoE-shaped one (no MoE checkpoint is reachable here):
hidden 1024, 12 layers, 16 heads over 4 KV heads of 64, 64 experts, top 8, experts of 384,
vocabulary 32000. Each side decodes 32 tokens after a 16-token prompt through the test
harness's paged loop (``tests/test_models.paged_greedy_generate``), the prompt's time
subtracted; both sides run the same native experts and linears, so the difference is the
per-layer Python and tensor work the stack removes.

    python -m bench.moe_stack [--layers 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_models import paged_greedy_generate  # noqa: E402

from xllm.models.config import ModelConfig  # noqa: E402
from xllm.models.registry import get_model_class  # noqa: E402


def _model(layers: int, fmt: str):  # noqa: ANN202
    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["Qwen3MoeForCausalLM"], hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        vocab_size=32000, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=384,
        max_position_embeddings=4096, norm_topk_prob=True))
    model = get_model_class(cfg.architecture)(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name
                    else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model.attach_rows(fmt)
    return model


def ms_per_token(model, stack: bool, new: int = 32) -> float:  # noqa: ANN001
    if not stack:
        native = model.use_native_stack
        model.use_native_stack = lambda enabled=True: native(False)
    prompt = [list(range(1, 17))]
    paged_greedy_generate(model, prompt, 4)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        paged_greedy_generate(model, prompt, new + 1)
        t1 = time.perf_counter()
        paged_greedy_generate(model, prompt, 1)
        t2 = time.perf_counter()
        best = min(best, ((t1 - t0) - (t2 - t1)) / new)
    assert (model._stack is not None) == stack
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.moe_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = []
    print("| format | native stack | modules | speed-up |")
    print("| --- | --- | --- | --- |")
    for fmt in ("bf16_gemm", "q8_0"):
        stack = ms_per_token(_model(args.layers, fmt), True)
        modules = ms_per_token(_model(args.layers, fmt), False)
        rows.append({"format": fmt, "stack_ms": stack, "modules_ms": modules})
        print(f"| {fmt} | {stack:.2f} ms/token | {modules:.2f} ms/token | "
              f"{modules / stack:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
