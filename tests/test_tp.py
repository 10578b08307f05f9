"""Tensor parallelism (xllm.layers.parallel, xllm.runtime.tp): TP=2 against TP=1.

- how heads split (whole GQA groups, replicated KV heads, uneven splits, impossible ones);
- the step messages: replayed against a real scheduler with preemption, every worker mirror
  holds exactly the request's tokens and blocks, and a decode costs a few dozen bytes;
- TP=2 greedy output equals TP=1 on random-weight configs of each architecture (the module
  path and the native stack) and on the demo model; where fp32 summation order flips a
  near-tie, the test shows the top-2 logprob gap at the first difference instead of failing;
- seeded sampling, n > 1, prompt logprobs and preemption under TP=2 equal TP=1;
- a killed worker ends in an error within seconds, never a hang; bad sizes fail at start-up.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import read_ready_port  # noqa: E402
from test_models import VARIANTS, VOCAB, hf_model, save_with_tokenizer  # noqa: E402

from xllm import LLM, SamplingParams  # noqa: E402
from xllm.config import EngineConfig  # noqa: E402
from xllm.layers.parallel import TensorParallel, check_tensor_parallel, head_shard  # noqa: E402
from xllm.runtime.tp import StepDecoder, StepEncoder  # noqa: E402
from xllm.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TWO_CORES = len(os.sched_getaffinity(0)) >= 2
needs_two = pytest.mark.skipif(not TWO_CORES, reason="TP=2 needs two cores")


# ---------------------------------------------------------------- how heads split


@pytest.mark.parametrize("heads, kv, n", [(8, 8, 2), (8, 2, 2), (9, 3, 2), (12, 4, 3),
                                          (8, 1, 2), (8, 2, 4), (9, 3, 6), (6, 3, 4)])
def test_head_shards_cover_every_head_once(heads: int, kv: int, n: int) -> None:
    if kv < n and n % kv:
        with pytest.raises(ValueError, match="multiple"):
            head_shard(heads, kv, TensorParallel(0, n, comm=object()))
        return
    group = heads // kv
    seen = []
    for r in range(n):
        s = head_shard(heads, kv, TensorParallel(r, n, comm=object()))
        assert s.num_heads >= 1 and s.num_heads % s.num_kv_heads == 0
        local_group = s.num_heads // s.num_kv_heads
        for i in range(s.num_heads):  # the kernels' mapping is the checkpoint's mapping
            assert s.kv_start + i // local_group == (s.q_start + i) // group
        seen += range(s.q_start, s.q_start + s.num_heads)
    assert seen == list(range(heads))


def test_impossible_and_uneven_splits_are_reported() -> None:
    with pytest.raises(ValueError, match="exceeds the model's 4 attention heads"):
        check_tensor_parallel(4, 2, 128, 8)
    with pytest.raises(ValueError, match="ranks must be a multiple"):
        check_tensor_parallel(8, 2, 128, 3)
    notes = check_tensor_parallel(9, 3, 1536, 2)  # the demo model
    assert len(notes) == 1 and "(6, 3 heads)" in notes[0]
    assert check_tensor_parallel(8, 2, 128, 2) == []


def test_bad_sizes_fail_at_start_up() -> None:
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="every rank needs a core"):
        EngineConfig(tensor_parallel_size=cores + 1)
    with pytest.raises(ValueError, match="CUDA devices"):
        EngineConfig(tensor_parallel_size=2, device="cuda")
    with pytest.raises(ValueError, match="tp_backend"):
        EngineConfig(tensor_parallel_size=2, tp_backend="mpi")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(tensor_parallel_size=2, device="cuda", tp_master="10.0.0.1:29500")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(tensor_parallel_size=2, device="cuda", tp_backend="gloo",
                     kv_offload_cpu_gb=1.0)
    # (KV tiers with ranks on other hosts are allowed: their parts travel through the
    # workers' part servers, tests/test_tp_hosts.py)
    assert EngineConfig(tensor_parallel_size=2, kv_offload_cpu_gb=1.0,
                        tp_master="10.0.0.1:29500").kv_tiers
    with pytest.raises(ValueError, match=">= 1"):
        EngineConfig(tensor_parallel_size=0)


# ---------------------------------------------------------------- step messages


class _GatherInTurns:
    """Two ranks' gather run one after the other: rank 1's part kept, rank 0 joins it."""

    def __init__(self) -> None:
        self.part: torch.Tensor | None = None

    def gather(self, src: torch.Tensor, dst: torch.Tensor | None, rows: int = 1) -> None:
        if dst is None:
            self.part = src.clone()
            return
        assert self.part is not None and rows == src.shape[0]
        joined = dst.view(rows, 2, -1)
        joined[:, 0] = src
        joined[:, 1] = self.part


@pytest.mark.parametrize("vocab", [384, 383, 3])
def test_the_lm_heads_argmax_gather_picks_what_the_whole_rows_would(vocab: int) -> None:
    """The greedy path of the LM head under TP: each rank sends its slice's best (value,
    token), rank 0 combines. It returns argmax_first of the whole rows -- ties to the lower
    token across the ranks' boundary, the first NaN, rows of -inf -- and never a padding row
    of the last slice (odd vocabularies; 3 tokens over 2 ranks)."""
    from xllm.layers.embedding import LMHead
    from xllm.layers.sampler import argmax_first

    comm = _GatherInTurns()
    heads = [LMHead(vocab, 8, tp=TensorParallel(r, 2, comm)) for r in range(2)]
    rows = -(-vocab // 2)
    full = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(vocab))
    full[0] *= 4  # the longest row: hidden[1] below is the best match for it
    if vocab > rows:
        full[rows] = full[0]  # rank 1's first token ties rank 0's first
    for r, head in enumerate(heads):
        part = torch.full((rows, 8), 50.0)  # padding rows that would win if read
        mine = full[r * rows:(r + 1) * rows]
        part[:len(mine)] = mine
        head.weight.data = part
    hidden = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    hidden[1] = full[0] * 10  # tokens 0 and ``rows`` (if any) share this row's maximum
    want = argmax_first(hidden @ full.T)
    assert want[1] == 0
    assert heads[1](hidden, argmax=True) is None  # (the worker's turn first)
    got = heads[0](hidden, argmax=True)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    # NaN and -inf rows, through the combine alone
    from xllm.layers.embedding import combine_argmax

    best = torch.tensor([[[1.0, 4.0], [1.0, 200.0]],           # a tie: the lower token
                         [[2.0, 7.0], [float("nan"), 250.0]],  # a NaN wins
                         [[float("nan"), 9.0], [float("nan"), 300.0]],  # the first NaN
                         [[-float("inf"), 0.0], [-float("inf"), 192.0]],
                         [[0.5, 3.0], [0.7, 201.0]]])
    assert combine_argmax(best).tolist() == [4, 250, 9, 0, 201]


@pytest.mark.parametrize("overlap", [False, True])
def test_step_messages_keep_worker_mirrors_exact(overlap: bool) -> None:
    """A scheduler short of blocks preempts and readmits; every step's message, applied to
    the workers' mirrors, gives each scheduled request exactly its tokens and blocks. With
    overlap scheduling each step is encoded before the previous one's tokens are in (its
    decodes' tokens are holes, filled once they are)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64, block_size=4,
                                      num_blocks=40, max_model_len=128,
                                      enable_prefix_caching=True, overlap=overlap))
    gen = torch.Generator().manual_seed(3)
    for i in range(8):
        prompt = torch.randint(0, 100, (5 + 7 * i,), generator=gen).tolist()
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=20 + i,
                                                                  ignore_eos=True)))
    encoder, decoder = StepEncoder(), StepDecoder()
    decode_bytes = []
    preempted = holes = 0
    inflight = None
    while sched.has_unfinished_requests() or inflight is not None:
        out = sched.schedule()
        preempted += len(out.preempted_ids)
        message = encoder.encode(out, None) if out.scheduled else None
        if inflight is not None:  # overlap: the step in flight finishes now
            sched.update_from_output(*inflight)
            inflight = None
        if message is None:
            continue
        holes += len(message.holes)
        message.fill()
        message.set_argmax(holes % 2 == 1)  # (either kind of step message decodes the same)
        mirrored, rows, argmax = decoder.decode(message.array.tobytes())
        assert len(rows) == 0 and argmax == (holes % 2 == 1)
        assert len(mirrored.decodes) == len(out.decodes)
        for item, copy in zip(out.scheduled, mirrored.scheduled, strict=True):
            end = item.num_computed_tokens + item.num_new_tokens
            assert copy.request.all_token_ids[:end] == item.request.all_token_ids[:end]
            assert copy.request.block_ids == item.request.block_ids
            assert (copy.num_computed_tokens, copy.num_new_tokens, copy.samples) == (
                item.num_computed_tokens, item.num_new_tokens, item.samples)
        live = {item.request.request_id for item in out.scheduled}
        assert len(decoder.mirrors) == len(live)  # nothing unscheduled lingers
        if not out.prefills:
            decode_bytes.append(4 * len(message.array) / len(out.scheduled))
        sampled = [[int(torch.randint(0, 100, (1,), generator=gen))] if item.samples else []
                   for item in out.scheduled]
        if overlap:
            inflight = (out, sampled)
        else:
            sched.update_from_output(out, sampled)
    assert preempted > 0, "the workload was meant to preempt"
    assert (holes > 0) == overlap
    assert decode_bytes and max(decode_bytes) <= 64  # 24 bytes an item + its token (+ a block)


# ---------------------------------------------------------------- TP=2 against TP=1


def _model_dir(name: str, native_sizes: bool, root: Path, demo_dir: Path) -> Path:
    out = root / f"{name}-{int(native_sizes)}"
    if not out.exists():
        save_with_tokenizer(hf_model(name, native_sizes), out, demo_dir)
    return out


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _assert_same_or_near_tie(ref: list, got: list, tol: float = 1e-4) -> None:
    """Token-identical, or the first difference is at a near-tie of TP=1's top two (shown)."""
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.token_ids == b.token_ids:
            continue
        pairs = zip(a.token_ids, b.token_ids, strict=True)  # ignore_eos: equal lengths
        at = next(j for j, (x, y) in enumerate(pairs) if x != y)
        top2 = sorted(a.logprobs[at].values(), reverse=True)[:2]
        gap = top2[0] - top2[1]
        print(f"prompt {i}: TP=2 differs at token {at}; TP=1's top-2 logprob gap there {gap:.2e}")
        assert gap < tol, f"prompt {i} differs at token {at} with a top-2 gap of {gap}"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp_models")


@needs_two
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("path", ["modules", "native"])
def test_tp2_matches_tp1_on_each_architecture(name: str, path: str, models_root: Path,
                                              demo_model_dir: Path) -> None:
    native = path == "native"
    model_dir = _model_dir(name, native, models_root, demo_model_dir)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    options = dict(dtype="float32", weight_format="f32" if native else "dense",
                   max_model_len=128, num_kv_blocks=64, block_size=8)
    ref = _greedy(LLM(str(model_dir), **options), prompts, 32)
    llm = LLM(str(model_dir), tensor_parallel_size=2, **options)
    try:
        assert (llm.engine.runner.model._stack is not None) == native
        _assert_same_or_near_tie(ref, _greedy(llm, prompts, 32))
    finally:
        llm.engine.close()


@needs_two
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qknorm-headdim"])
def test_tp2_over_torch_distributed_matches_tp1(name: str, models_root: Path,
                                                demo_model_dir: Path) -> None:
    """tp_backend gloo: the sums and the LM head's gathers go through a torch.distributed
    process group (xllm.ops.dist_group, the path NCCL takes on CUDA), step messages still
    over shared memory; greedy (each rank's best token gathered), logprobs (the logits
    gathered) and seeded sampling as TP=1."""
    model_dir = _model_dir(name, False, models_root, demo_model_dir)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    options = dict(dtype="float32", weight_format="dense", max_model_len=128,
                   num_kv_blocks=64, block_size=8)
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)

    def run(llm: LLM) -> tuple:
        return (_greedy(llm, prompts, 24),
                [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)],
                [o.outputs[0].token_ids for o in llm.generate(prompts, seeded,
                                                                use_tqdm=False)])

    ref = run(LLM(str(model_dir), **options))
    llm = LLM(str(model_dir), tensor_parallel_size=2, tp_backend="gloo", **options)
    try:
        from xllm.ops.dist_group import DistGroup

        assert isinstance(llm.engine.workers.comm.comm, DistGroup)
        got = run(llm)
        assert llm.engine.workers.comm.reduce_seconds > 0  # the LM head's gathers, timed
    finally:
        llm.engine.close()
    _assert_same_or_near_tie(ref[0], got[0])
    assert got[1] == [o.token_ids for o in got[0]]  # the best tokens = the logits' argmax
    assert got[2] == ref[2]


@needs_two
def test_plain_greedy_rows_gather_the_ranks_best_tokens(demo_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TP a step whose sampled rows are all plain greedy (no logprobs, penalties,
    bias, min_tokens or grammar) gathers each rank's best token, not its logits; the tokens
    equal the full logits' argmax (the same engine asked for logprobs, which gathers them),
    and a step with any other row gathers the logits."""
    import xllm.layers.embedding as embedding

    calls = []
    real = embedding.combine_argmax
    monkeypatch.setattr(embedding, "combine_argmax",
                        lambda best: calls.append(best.shape[0]) or real(best))
    llm = LLM(str(demo_model_dir), tensor_parallel_size=2, dtype="float32",
              weight_format="blocks", max_model_len=256, num_kv_blocks=64)
    try:
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
        plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        scored = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
        assert len(calls) >= 20 and max(calls) == 3
        calls.clear()
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, scored, use_tqdm=False)]
        assert got == want and not calls
        seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)
        llm.generate(prompts[:2], [plain, seeded], use_tqdm=False)
        assert not calls  # a sampled row: the logits
    finally:
        llm.engine.close()


@needs_two
@pytest.mark.parametrize("overlap", [False, True])
def test_demo_model_tp2_equals_tp1_with_sampling_logprobs_and_preemption(
        demo_model_dir: Path, overlap: bool) -> None:
    """The demo model (3 KV groups over 2 ranks: uneven), on exact fp32 GGUF blocks through
    the native stack: greedy, seeded sampling with n = 2, prompt logprobs, and a pool small
    enough to preempt. With overlap scheduling the step messages carry holes for the tokens
    being sampled, filled before they go out."""
    options = dict(dtype="float32", weight_format="blocks", num_kv_blocks=12, max_num_seqs=6)
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away,", "List three colours:",
               "Water boils at", "The best way to learn is"]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, n=2)
    scored = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3)

    def run(llm: LLM) -> tuple:
        g = [o.outputs[0] for o in llm.generate(prompts, greedy, use_tqdm=False)]
        s = [[c.token_ids for c in o.outputs]
             for o in llm.generate(prompts[:3], sampled, use_tqdm=False)]
        p = llm.generate(prompts[1], scored, use_tqdm=False)[0]
        return g, s, p, llm.engine.scheduler.stats().num_preempted

    ref = run(LLM(str(demo_model_dir), **options))
    llm = LLM(str(demo_model_dir), tensor_parallel_size=2, overlap_scheduling=overlap,
              **options)
    try:
        got = run(llm)
    finally:
        llm.engine.close()
    # Overlap schedules a step behind the tokens, so its preemptions may fall elsewhere.
    assert ref[3] > 0 and got[3] > 0 and (overlap or got[3] == ref[3]), "meant to preempt"
    _assert_same_or_near_tie(ref[0], got[0])
    assert got[1] == ref[1]
    assert got[2].outputs[0].token_ids == ref[2].outputs[0].token_ids
    for a, b in zip(ref[2].prompt_logprobs[1:], got[2].prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        assert max(abs(a[t] - b[t]) for t in a) < 1e-4


@needs_two
def test_demo_model_tp2_in_bf16_with_bf16_sums_stays_close(demo_model_dir: Path) -> None:
    """Computing in bf16 (int8 or bf16 products), the row-parallel sums travel as bf16: the
    prompt's perplexity stays within the format's bound (test_reduced_precision) of one
    rank's, and its per-token logprobs close (measured: +0.9% and 0.04 on the int8 default,
    where fp32 sums give +0.6% and 0.04: most of it is the split products' order)."""
    from test_reduced_precision import PPL_BOUND, TEXT

    from xllm import _C

    fmt = "int8" if _C.detected_isa() in ("avx512", "avx512_bf16", "amx") else "bf16"
    options = dict(dtype="bfloat16", weight_format=fmt, max_model_len=512,
                   kv_cache_memory_gb=0.1)

    def score(llm: LLM) -> list[float]:
        ids = llm.tokenizer.encode(TEXT)
        out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        return [entry[tok] for entry, tok in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]

    one = score(LLM(str(demo_model_dir), **options))
    llm = LLM(str(demo_model_dir), tensor_parallel_size=2, **options)
    try:
        assert llm.engine.runner.model.tp.bf16_sums
        two = score(llm)
    finally:
        llm.engine.close()
    ppl_one, ppl_two = (math.exp(-sum(lp) / len(lp)) for lp in (one, two))
    assert abs(ppl_two / ppl_one - 1) < PPL_BOUND[fmt], (ppl_one, ppl_two)
    assert sum(abs(a - b) for a, b in zip(one, two, strict=True)) / len(one) < 0.08


# ---------------------------------------------------------------- failure


@needs_two
def test_killed_worker_ends_in_an_error_not_a_hang(models_root: Path,
                                                   demo_model_dir: Path) -> None:
    model_dir = _model_dir("llama-gqa", False, models_root, demo_model_dir)
    llm = LLM(str(model_dir), tensor_parallel_size=2, dtype="float32", weight_format="dense",
              max_model_len=128, num_kv_blocks=64)
    engine = llm.engine
    try:
        worker = engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        with pytest.raises(RuntimeError, match="died while the engine was idle"):
            engine.maintain()  # an idle server notices too (its loop calls this)
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 5
    finally:
        engine.close()
    assert not engine.workers.alive()


@needs_two
def test_server_with_tp_serves_reports_and_exits_when_a_worker_dies(
        demo_model_dir: Path) -> None:
    """xllm-server --tensor-parallel-size 2: answers, /metrics shows the ranks' sums and the
    model's idle share; a killed worker makes requests fail with 503 and the server exit."""
    import http.client
    import json
    import subprocess
    import sys

    def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, path, json.dumps(body) if body else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    proc = subprocess.Popen(
        [sys.executable, "-m", "xllm.api.server", "--model", str(demo_model_dir), "--port", "0",
         "--max-model-len", "128", "--kv-cache-memory-gb", "0.05", "--dtype", "float32",
         "--tensor-parallel-size", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        port = read_ready_port(proc, lines)
        body = {"model": str(demo_model_dir), "prompt": "One, two,", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}
        status, text = call(port, "POST", "/v1/completions", body)
        assert status == 200, text
        status, text = call(port, "GET", "/metrics")
        values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
                  for ln in text.splitlines() if ln and not ln.startswith("#")}
        assert values["xllm_tp_allreduce_seconds_total"] > 0
        assert values["xllm_tp_message_seconds_total"] > 0
        assert 0 <= values["xllm_tp_wait_seconds_total"] < (
            values["xllm_tp_allreduce_seconds_total"] + values["xllm_tp_message_seconds_total"])
        assert 0 < values["xllm_tp_allreduce_seconds_per_step"] < 1
        assert values["xllm_model_busy_seconds_total"] > 0
        assert 0 <= values["xllm_model_idle_ratio"] < 1
        workers = [int(p) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                   for p in (task / "children").read_text().split()]
        assert len(workers) == 1
        # Killed mid-request: that request gets a 503, and the server exits.
        import threading

        answers: list[tuple[int, str]] = []
        long = dict(body, max_tokens=120)
        caller = threading.Thread(target=lambda: answers.append(
            call(port, "POST", "/v1/completions", long)))
        caller.start()
        time.sleep(0.5)
        os.kill(workers[0], signal.SIGKILL)
        caller.join(30)
        assert answers and answers[0][0] == 503, answers
        assert "died" in answers[0][1]
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _shmem_kib(pid: int) -> int:
    """A process's resident shared memory (memfd pages it has mapped and touched), KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


@needs_two
def test_worker_kv_memory_follows_rank_0s_pool(demo_model_dir: Path) -> None:
    """A worker's share of the pool is mapped as rank 0's pool maps page groups, and given
    back when rank 0 gives its idle groups back (kv_cache_memory_gb is a ceiling on every
    rank, not a reservation on some); it serves again after."""
    import time

    llm = LLM(str(demo_model_dir), dtype="float32", tensor_parallel_size=2,
              kv_cache_memory_gb=0.5, kv_idle_release_s=0.0, max_num_batched_tokens=2048)
    try:
        engine = llm.engine
        pid = engine.workers.procs[0].pid
        before = _shmem_kib(pid)
        prompts = [f"Request {i}: " + "tell me a long story about ships " * 60
                   for i in range(16)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        burst = _shmem_kib(pid)
        store = engine.kv_store
        assert store.memory.num_mapped_groups > 1
        # the worker touched its heads of the burst's blocks (rank 1 holds 1 of 3 KV groups)
        assert burst - before > 0.2 * store.mapped_bytes / 1024, (before, burst)
        engine.maintain()
        engine.maintain()
        assert store.memory.num_mapped_groups == 1
        # What the worker may keep: its heads of rank 0's remaining group (the null block's),
        # the same blocks in its own groups of as many blocks.
        heads = engine.model_config.num_key_value_heads
        kept_kib = store.mapped_bytes * (heads - store.config.num_kv_heads) \
            / store.config.num_kv_heads / 1024
        assert burst - before > kept_kib + 16 * 1024  # the burst reached beyond that group
        deadline = time.monotonic() + 10
        while _shmem_kib(pid) > before + kept_kib + 64 and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker applies the message after the broadcast returns
        assert _shmem_kib(pid) <= before + kept_kib + 64, (before, burst, _shmem_kib(pid))
        out = llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4),
                           use_tqdm=False)
        assert all(o.finished for o in out)
    finally:
        llm.engine.close()


def _tp_model(which: str, models_root: Path, demo_model_dir: Path) -> tuple[Path, dict]:
    """llama-gqa (2 KV heads: one a rank) on f32 rows, or the demo (3 KV heads: parts of 2
    and 1) on exact fp32 blocks."""
    if which == "even":
        return _model_dir("llama-gqa", True, models_root, demo_model_dir), {"weight_format": "f32"}
    return demo_model_dir, {"weight_format": "blocks"}


@needs_two
@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("split", ["even", "uneven"])
def test_kv_tiers_under_tp_carry_every_ranks_heads(models_root: Path, demo_model_dir: Path,
                                                   tmp_path: Path, tier: str,
                                                   split: str) -> None:
    """KV tiers under TP=2: rank 0 copies every rank's heads of a block (the workers' shares
    mapped in its process; parts of equal or unequal heads) to a tier and back. A document
    evicted from the pool by other prompts comes back from the CPU tier or from disk and the
    answers equal TP=1's without tiers."""
    model_dir, fmt = _tp_model(split, models_root, demo_model_dir)
    gen = torch.Generator().manual_seed(7)
    doc = torch.randint(0, VOCAB, (64,), generator=gen).tolist()
    prompts = [doc + torch.randint(0, VOCAB, (5,), generator=gen).tolist() for _ in range(3)]
    floods = [torch.randint(0, VOCAB, (70,), generator=gen).tolist() for _ in range(4)]
    options = dict(dtype="float32", max_model_len=128, num_kv_blocks=24, block_size=8,
                   max_num_seqs=1, **fmt)
    ref = _greedy(LLM(str(model_dir), **options), prompts, 16)
    tiers = (dict(kv_offload_cpu_gb=0.05) if tier == "cpu" else
             dict(kv_offload_disk=str(tmp_path / "kv"), kv_offload_disk_gb=0.05))
    llm = LLM(str(model_dir), tensor_parallel_size=2, **options, **tiers)
    try:
        store = llm.engine.kv_store
        assert store.config.parts == 2 and store.whole
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
        got = [llm.generate([prompts[0]], params, use_tqdm=False)[0]]
        for prompt in prompts[1:]:
            llm.generate(floods, SamplingParams(max_tokens=4), use_tqdm=False)  # evicts doc
            store.flush()
            assert store.tiers[0].num_blocks >= 8
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            assert out.num_cached_tokens >= 64, out.num_cached_tokens  # the doc, from the tier
            got.append(out)
        assert store.tiers[0].hit_blocks >= 16
        _assert_same_or_near_tie(ref, [o.outputs[0] for o in got])
    finally:
        llm.engine.close()


@needs_two
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_kv_tiers_under_tp_for_a_latent_cache(tmp_path: Path, demo_model_dir: Path,
                                              tier: str) -> None:
    """MLA under TP=2: every rank caches the same latent rows, so a block is rank 0's part,
    written back into every rank's share on a load (replicas). A document evicted from the
    pool by other prompts comes back from the tier with TP=1's answers; its layout is a
    one-rank instance's, so a TP=1 engine then reads the disk tier TP=2 wrote."""
    import test_expert_parallel

    model_dir = test_expert_parallel._model_dir(tmp_path / "m", demo_model_dir, "deepseek-v3")
    gen = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 256, (64,), generator=gen).tolist()
    prompts = [doc + torch.randint(0, 256, (5,), generator=gen).tolist() for _ in range(3)]
    floods = [torch.randint(0, 256, (70,), generator=gen).tolist() for _ in range(4)]
    options = dict(dtype="float32", weight_format="f32", max_model_len=128, num_kv_blocks=24,
                   block_size=8, max_num_seqs=1)
    tiers = (dict(kv_offload_cpu_gb=0.05) if tier == "cpu" else
             dict(kv_offload_disk=str(tmp_path / "kv"), kv_offload_disk_gb=0.05))
    ref = _greedy(LLM(str(model_dir), **options), prompts, 16)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    llm = LLM(str(model_dir), tensor_parallel_size=2, enable_expert_parallel=True, **options,
              **tiers)
    try:
        store = llm.engine.kv_store
        assert store.config.replicated and store.whole and store.single_part
        c = store.config
        assert c.block_bytes == c.segment_bytes * c.num_layers  # one part: its latent rows
        got = [llm.generate([prompts[0]], params, use_tqdm=False)[0]]
        for prompt in prompts[1:]:
            llm.generate(floods, SamplingParams(max_tokens=4), use_tqdm=False)  # evicts doc
            store.flush()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            assert out.num_cached_tokens >= 64, out.num_cached_tokens  # the doc, from the tier
            got.append(out)
        assert store.tiers[0].hit_blocks >= 16
        _assert_same_or_near_tie(ref, [o.outputs[0] for o in got])
        layout = store.layout_key()
    finally:
        llm.engine.close()
    if tier == "cpu":
        return
    one = LLM(str(model_dir), **options, **tiers)  # one rank, the disk TP=2 wrote
    try:
        assert one.engine.kv_store.layout_key() == layout
        out = one.generate([prompts[0]], params, use_tqdm=False)[0]
        assert out.num_cached_tokens >= 64 and one.engine.kv_store.disk.hit_blocks >= 8
        _assert_same_or_near_tie(ref[:1], [out.outputs[0]])
    finally:
        one.engine.close()


@needs_two
def test_pd_between_tp_instances_on_one_host(demo_model_dir: Path) -> None:
    """Prefill and decode instances at TP=2 under a master: the decode instance copies the
    prefill's held blocks itself (pull), every rank's part of each from the prefill's
    memfds, and the streams equal a TP=2 mixed instance's."""
    import asyncio

    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", weight_format="blocks",
                       max_model_len=256, num_kv_blocks=64, tensor_parallel_size=2)
    doc = "Two lighthouses stood on the cape, and their keepers traded letters. " * 4
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run(prefill, decode) -> None:  # noqa: ANN001
        tok = prefill.engine.tokenizer
        prompts = [tok.encode(doc + q) for q in ("Who wrote first?", "What did they trade?")]
        want = []
        for prompt in prompts:  # the prefill instance alone, as a mixed one
            want.append([o async for o in prefill.generate(prompt, params)][-1]
                        .outputs[0].token_ids)
        async with cluster([(prefill, "prefill"), (decode, "decode")]) as (_, master):
            got = []
            for prompt in prompts:
                outs = [o async for o in master.generate(prompt, params)]
                got.append(outs[-1].outputs[0].token_ids)
            assert got == want
            assert master.num_pd_handoffs == len(prompts)
            store = decode.engine.kv_store
            assert set(store.peer_blocks_by_path) == {"shm"}
            assert store.peer_blocks_by_path["shm"] >= len(prompts[0]) // 16

    with engines(cfg, 2) as (prefill, decode):
        asyncio.run(run(prefill, decode))


def _peer_fetch(configs: list, prompt: list[int], params: SamplingParams, same_host: bool,
                check) -> tuple[int, object]:  # noqa: ANN001
    """Two instances (``configs``: the serving one's, the fetching one's) over real gRPC: the
    first computes ``prompt``, ``check(fetcher's store)`` runs, the second fetches the
    prompt's full blocks but the last (``same_host``: through shared memory) and answers
    ``prompt``; returns (blocks fetched, its last output)."""
    import asyncio

    import grpc

    from xllm.engine.async_engine import AsyncEngine
    from xllm.service.instance import InstanceServicer
    from xllm.service.proto import instance_pb2_grpc

    engines = [AsyncEngine(c) for c in configs]
    for e in engines:
        e.start()
    result: list = []

    async def run() -> None:
        server = grpc.aio.server()
        instance_pb2_grpc.add_InstanceServicer_to_server(InstanceServicer(engines[0]), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        client = InstanceServicer(engines[1])
        client.same_host = lambda peer: same_host  # type: ignore[method-assign]
        try:
            async for _ in engines[0].generate(prompt, params):
                pass
            store = engines[1].engine.kv_store
            check(store)
            store._prefill_tps = None  # always fetch
            n = (len(prompt) - 1) // store.config.block_size
            result.append(await client.fetch_from_peer(address, prompt, n))
            result.append([o async for o in engines[1].generate(prompt, params)][-1])
        finally:
            await client.close_peers()
            await server.stop(0.5)

    try:
        for e in engines:
            assert e.wait_ready(120), e.error
        asyncio.run(run())
    finally:
        for e in engines:
            e.shutdown()
    return result[0], result[1]


@needs_two
@pytest.mark.parametrize("same_host", [True, False])
def test_latent_tp_instance_fetches_a_one_rank_peers_blocks(tmp_path: Path,
                                                           demo_model_dir: Path,
                                                           same_host: bool) -> None:
    """An MLA instance at TP=2 has a one-rank instance's layout (its parts are replicas): it
    fetches a TP=1 peer's prefix over shared memory or gRPC into rank 0's part, copies it
    on to rank 1's, and answers as TP=1 does."""
    import test_expert_parallel

    model_dir = test_expert_parallel._model_dir(tmp_path, demo_model_dir, "deepseek-v3")
    prompt = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(8)).tolist()
    options = dict(dtype="float32", weight_format="f32", max_model_len=128, num_kv_blocks=32,
                   block_size=8)
    ref = _greedy(LLM(str(model_dir), **options), [prompt], 12)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    stores = []

    def check(store) -> None:  # noqa: ANN001
        assert store.config.replicated and store.whole and store.single_part
        stores.append(store)

    n, out = _peer_fetch([EngineConfig(model=str(model_dir), **options),
                          EngineConfig(model=str(model_dir), tensor_parallel_size=2,
                                       enable_expert_parallel=True, **options)],
                         prompt, params, same_host, check)
    assert n == (len(prompt) - 1) // 8
    assert stores[0].peer_blocks_by_path == {"shm" if same_host else "grpc": n}
    assert out.num_cached_tokens == n * 8
    _assert_same_or_near_tie(ref, [out.outputs[0]])


@needs_two
@pytest.mark.parametrize("split, same_host", [("even", True), ("uneven", True),
                                              ("uneven", False)])
def test_tp_instances_move_whole_blocks_between_them(models_root: Path,
                                                     demo_model_dir: Path,
                                                     split: str, same_host: bool) -> None:
    """Two TP=2 instances over real gRPC: the fetcher gets the peer's prefix, every rank's
    heads of each block (rank 0 of each reaches its workers' shares): on one host the
    server writes them straight into every part of the fetcher's memory (each rank's memfd
    mapped), else they stream; its answer is TP=1's."""
    model_dir, fmt = _tp_model(split, models_root, demo_model_dir)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (70,), generator=gen).tolist()
    options = dict(dtype="float32", max_model_len=128, num_kv_blocks=32, block_size=8, **fmt)
    ref = _greedy(LLM(str(model_dir), **options), [prompt], 12)
    cfg = EngineConfig(model=str(model_dir), tensor_parallel_size=2, **options)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    stores = []

    def check(store) -> None:  # noqa: ANN001
        assert store.whole and not store.single_part
        assert len(store.memory_parts()) == 2  # rank 0's memfd and the worker's
        stores.append(store)

    n, out = _peer_fetch([cfg, cfg], prompt, params, same_host, check)
    assert n == (len(prompt) - 1) // 8
    assert stores[0].peer_blocks_by_path == {"shm" if same_host else "grpc": n}
    assert out.num_cached_tokens == n * 8
    _assert_same_or_near_tie(ref, [out.outputs[0]])
