"""The Triton fused mixture-of-experts kernels against the torch reference (moe_reference).

Without a GPU the kernels run on CPU tensors in Triton's interpreter, set up as in
tests/test_triton_attention.py (TRITON_INTERPRET=1 before triton is first imported, else the
cases run in a child pytest). With CUDA they run compiled in the tests marked `gpu`.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
import torch
from triton_interpreter import run_interpreter_cases

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed; the kernels need it")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from xllm.layers.moe import moe_reference, route  # noqa: E402
from xllm.ops.triton import moe as tri  # noqa: E402

IN_PROCESS = tri.INTERPRETED and isinstance(triton.language.zeros, InterpretedFunction)
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    if not IN_PROCESS:
        pytest.skip("CUDA is present: the gpu-marked tests run these cases" if CUDA else
                    "triton was imported before TRITON_INTERPRET=1 could be set; "
                    "test_interpreter_cases_in_subprocess runs these cases")
    return tri


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    if not CUDA:
        pytest.skip("no CUDA device")
    if tri.INTERPRETED:
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1 in this process")
    return tri


@pytest.mark.skipif(IN_PROCESS or CUDA, reason="the interpreter cases run in this process")
def test_interpreter_cases_in_subprocess() -> None:
    run_interpreter_cases(__file__)


# (tokens, experts, top_k, hidden, intermediate, weight dtype)
CASES = [
    (1, 8, 2, 64, 32, torch.float32),  # decode: two experts, the rest idle
    (5, 8, 2, 64, 32, torch.float32),
    (33, 6, 3, 96, 48, torch.float32),  # sizes not multiples of the tiles
    (70, 4, 4, 64, 64, torch.float32),  # every expert chosen by every token, > BLOCK_M rows
    (9, 8, 2, 64, 32, torch.bfloat16),
]


def check(impl: ModuleType, device: str, case: tuple, seed: int) -> None:
    t, e, k, h, i, dtype = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(dtype)
    logits = torch.randn(t, e, generator=gen)
    if t == 9:
        logits[:, 5:] = -1e9  # experts 5-7 get no tokens
    ids, w = route(logits, k, True)
    want = moe_reference(x.to(dtype).float(), ids, w, w13.float(), w2.float())
    got = impl.fused_moe(x.to(device).to(dtype), w13.to(device), w2.to(device), ids.to(device),
                         w.to(device))
    assert got.dtype == dtype and got.shape == (t, h)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c[0]}e{c[1]}k{c[2]}h{c[3]}i{c[4]}")
def test_fused_moe_matches_reference(interp: ModuleType, case: tuple) -> None:
    check(interp, "cpu", case, seed=CASES.index(case))


def test_alignment_groups_pairs_by_expert_in_whole_blocks(interp: ModuleType) -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
    sorted_pairs, block_expert = interp.align_by_expert(ids, 5, 2)
    # Pairs (t * k + j): expert 0 has 1, 4; expert 1 has 3; expert 2 has 0, 2, 5, 6; expert 3
    # has 7; expert 4 none. Runs padded to 2 with the sentinel 8.
    assert sorted_pairs.tolist()[:10] == [1, 4, 3, 8, 0, 2, 5, 6, 7, 8]
    assert block_expert.tolist()[:5] == [0, 1, 2, 2, 3]
    assert len(block_expert) == 4 + 5 and set(block_expert.tolist()[5:]) == {-1}
    assert (sorted_pairs[10:] == 8).all()


def test_fused_moe_rejects_bad_shapes(interp: ModuleType) -> None:
    x = torch.zeros(2, 8)
    w13, w2 = torch.zeros(3, 8, 8), torch.zeros(3, 8, 4)
    ids, w = torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
    with pytest.raises(ValueError, match="do not fit x"):
        interp.fused_moe(x, w13, torch.zeros(3, 8, 5), ids, w)
    with pytest.raises(ValueError, match="must both be \\[2, top_k\\]"):
        interp.fused_moe(x, w13, w2, ids, torch.ones(2, 3))
    assert interp.fused_moe(x[:0], w13, w2, ids[:0], w[:0]).shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(256, 64, 8, 1024, 384, torch.bfloat16),
                                          (1, 64, 8, 1024, 384, torch.bfloat16)],
                         ids=lambda c: f"t{c[0]}e{c[1]}k{c[2]}h{c[3]}i{c[4]}")
def test_gpu_fused_moe(gpu: ModuleType, case: tuple) -> None:
    check(gpu, "cuda", case, seed=1)
