"""Overlap scheduling: the next step scheduled and prepared while the current one computes
gives the same tokens, texts, stops and logprobs as the synchronous engine."""

from __future__ import annotations

import random
import time
import zlib

import pytest

from xllm import LLM, SamplingParams
from xllm.config import EngineConfig
from xllm.layers.sampler import SamplingBatch
from xllm.scheduler import Request, Scheduler, SchedulerConfig

EOS = 0


def _next_token(tokens: list[int]) -> int:
    """A deterministic stand-in for the model: a function of the context's tail."""
    return zlib.crc32(repr(tokens[-3:]).encode()) % 40


def _drive_scheduler(overlap: bool, seed: int) -> tuple[dict[str, tuple], Scheduler, int]:
    """Runs a random workload (EOS stops, max_tokens, aborts, preemption from a small pool)
    through a scheduler, pipelined as the overlap engine does when ``overlap``: step N+1 is
    scheduled before step N's tokens are in."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, block_size=4,
                                      num_blocks=36, max_model_len=96, overlap=overlap))
    rng = random.Random(seed)
    requests = {}
    for i in range(14):
        prompt = [rng.randrange(1, 40) for _ in range(rng.randrange(3, 30))]
        params = SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=i % 3 == 0)
        req = Request(f"r{i}", prompt, params, eos_token_ids={EOS}, priority=i % 2,
                      offline=i % 5 == 4)
        requests[req.request_id] = req
        sched.add_request(req)
    aborted_after = {"r3": 5, "r8": 2}  # abort once it has that many outputs
    inflight = None
    preempted = 0
    while sched.has_unfinished_requests() or inflight is not None:
        out = sched.schedule()
        preempted += len(out.preempted_ids)
        if inflight is not None:  # the step in flight finishes now
            sched.update_from_output(*inflight)
            inflight = None
        # The model reads the tokens once they are in (the runner's complete()).
        sampled = []
        for item in out.scheduled:
            req = item.request
            end = item.num_computed_tokens + item.num_new_tokens
            if item.samples:
                known = req.all_token_ids[:end]
                assert len(known) == end or req.is_finished, "a token the model needs is missing"
                sampled.append([_next_token(known)])
            else:
                sampled.append([])
        if overlap:
            inflight = (out, sampled) if out.scheduled else None
        else:
            sched.update_from_output(out, sampled)
        for rid, limit in aborted_after.items():
            req = requests[rid]
            if len(req.output_token_ids) >= limit and not req.is_finished:
                sched.abort_requests(rid)
    result = {rid: (req.output_token_ids, req.finish_reason, req.stop_reason)
              for rid, req in requests.items()}
    return result, sched, preempted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scheduler_pipelined_gives_the_same_tokens_and_frees_everything(seed: int) -> None:
    sync, _, _ = _drive_scheduler(False, seed)
    piped, sched, preempted = _drive_scheduler(True, seed)
    assert piped == sync
    assert preempted > 0, "the small pool was meant to preempt"
    assert {reason for _, reason, _ in sync.values()} >= {"stop", "length", "abort"}
    assert sched.kv.usage == 0 and not sched._release_later  # every block back
    assert sched.kv.pool.num_free_blocks == sched.config.num_usable_blocks


def test_scheduler_overlap_limits_and_parking() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4,
                                      num_blocks=20, max_model_len=64, overlap=True))
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    b = Request("b", [6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    second = sched.schedule()  # both decode their pending token
    assert [i.request_id for i in second.decodes] == ["a", "b"]
    assert all(i.num_computed_tokens == len(i.request.all_token_ids) for i in second.decodes)
    with pytest.raises(RuntimeError, match="before update_from_output"):
        sched.schedule()  # two outstanding at most
    with pytest.raises(ValueError, match="oldest"):
        sched.update_from_output(second, [[9], [9]])
    sched.update_from_output(first, [[9], [9]])
    third = sched.schedule()  # a's second token (its last) is in flight: a is not scheduled
    assert [i.request_id for i in third.scheduled] == ["b"]
    # b aborted while two steps computing it are in flight: its blocks wait for them.
    held = len(b.block_ids)
    free = sched.kv.pool.num_free_blocks
    sched.abort_requests("b")
    assert sched.kv.pool.num_free_blocks == free and "b" in sched._release_later
    sched.update_from_output(second, [[9], [9]])
    assert a.finish_reason == "length" and "b" in sched._release_later
    sched.update_from_output(third, [[9]])
    assert not sched._release_later
    assert held and sched.kv.pool.num_free_blocks == sched.config.num_usable_blocks


def test_sampling_batch_counts_pending_outputs() -> None:
    seeded = SamplingParams(temperature=1.0, seed=5)
    a = SamplingBatch.build([seeded], [[1]], [[2, 3]], vocab_size=50)
    b = SamplingBatch.build([seeded], [[1]], [[2]], vocab_size=50, num_pending=[1])
    assert a.groups[0].seed == b.groups[0].seed  # the step counts the token in flight
    with pytest.raises(ValueError, match="penalties"):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)], [[1]], [[2]], vocab_size=50,
                            num_pending=[1])


def test_config() -> None:
    assert EngineConfig().overlap is False  # not faster on a CPU (docs/benchmarks.md)
    assert EngineConfig(overlap_scheduling=True).overlap is True
    assert EngineConfig(overlap_scheduling=True, kv_offload_cpu_gb=1.0).overlap is True
    import argparse

    from xllm.config import add_engine_options

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert parser.parse_args(["--overlap-scheduling"]).overlap_scheduling is True
    assert parser.parse_args(["--no-overlap-scheduling"]).overlap_scheduling is False
    assert parser.parse_args([]).overlap_scheduling is None


# ------------------------------------------------------------------- the engine, demo model

PROMPTS = [f"Story {i}: once upon a time, in a land far away, there lived a " + "very " * i
           + "curious fox who" for i in range(10)]


def _params(i: int) -> SamplingParams:
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=11, n=2, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, stop=[" the", "."]),
        SamplingParams(temperature=0.8, seed=3, top_k=20, max_tokens=18, logprobs=2,
                       min_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=9, repetition_penalty=1.3, presence_penalty=0.5,
                       max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=1, ignore_eos=True),
    ]
    return kinds[i % len(kinds)]


def _run(demo_model_dir, overlap: bool, **options) -> tuple[dict, int, LLM]:  # noqa: ANN001, ANN003
    """The mixed workload on a KV pool small enough to preempt, driven step by step with one
    request (n = 1: when an n > 1 request's siblings start depends on the timing) aborted
    midway; returns what the caller saw of each request."""
    llm = LLM(model=str(demo_model_dir), dtype="float32", max_num_seqs=12,
              max_num_batched_tokens=48, num_kv_blocks=34, block_size=8,
              overlap_scheduling=overlap, **options)
    engine = llm.engine
    assert (engine._helper is not None) == overlap
    ids = []
    for i, prompt in enumerate(PROMPTS):
        rid = f"q{i}"
        engine.add_request(rid, prompt, _params(i), priority=i % 3)
        ids.append(rid)
    seen: dict[str, dict] = {rid: {"deltas": ["", ""], "final": None} for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            record = seen[out.request_id]
            for index, (text, _) in out.deltas.items():
                record["deltas"][index] += text
            record["final"] = out
            if out.request_id == "q6" and len(out.outputs[0].token_ids) >= 5 \
                    and not out.finished:
                engine.abort_request("q6")
    result = {}
    for rid, record in seen.items():
        out = record["final"]
        result[rid] = {
            "outputs": [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
                         c.cumulative_logprob) for c in out.outputs],
            "streamed": record["deltas"][:len(out.outputs)],
            "prompt_logprobs": out.prompt_logprobs,
            "finished": out.finished,
        }
    return result, engine.scheduler.num_preempted, llm


@pytest.mark.parametrize("tier", [False, True], ids=["pool", "cpu-tier"])
def test_engine_overlap_matches_synchronous(demo_model_dir, tier: bool) -> None:  # noqa: ANN001
    """Overlap on and off, the same outputs. With a CPU tier, preempted requests are swapped
    out and loaded back while steps are in flight: a load into blocks a victim's step in
    flight may still write waits for that step (KVStore.step_began / step_ended)."""
    options = dict(kv_offload_cpu_gb=0.05) if tier else {}
    sync, _, llm = _run(demo_model_dir, overlap=False, **options)
    llm.engine.close()
    piped, preempted, llm = _run(demo_model_dir, overlap=True, **options)
    engine = llm.engine
    try:
        assert preempted > 0, "the small pool was meant to preempt"
        if tier:
            store = engine.kv_store
            assert store.num_swapped > 0 and store.cpu.hit_blocks > 0, (
                store.num_swapped, store.cpu.hit_blocks)
        reasons = {o[2] for r in sync.values() for o in r["outputs"]}
        assert {"stop", "length"} <= reasons
        assert sync["q6"]["finished"] is False  # aborted: no final output after the abort
        for rid in sync:
            assert piped[rid] == sync[rid], rid
        # Streamed deltas add up to the final texts.
        for r in piped.values():
            assert r["streamed"] == [o[0] for o in r["outputs"]] or not r["finished"]
        assert engine.scheduler.kv.usage == 0 and not engine.scheduler._release_later
        assert engine.model_idle_seconds > 0 and engine.model_busy_seconds > 0
    finally:
        engine.close()


def test_async_engine_with_overlap_streams_and_aborts(demo_model_dir) -> None:  # noqa: ANN001
    """The server's engine thread with overlap: concurrent streams, one aborted by its
    reader mid-way; the others end as the synchronous engine's, and nothing stays held."""
    import asyncio

    from xllm.engine.async_engine import AsyncEngine

    prompts = PROMPTS[:6]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = LLM(model=str(demo_model_dir), dtype="float32", max_model_len=256)
    expected = [o.outputs[0].token_ids
                for o in reference.generate(prompts, params, use_tqdm=False)]
    reference.engine.close()
    engine = AsyncEngine(EngineConfig(model=str(demo_model_dir), dtype="float32",
                                      max_model_len=256, overlap_scheduling=True))
    engine.start()
    assert engine.wait_ready(120)

    async def one(i: int) -> list[int] | None:
        stream = engine.generate(prompts[i], params)
        last = None
        async for out in stream:
            last = out
            if i == 2 and len(out.outputs[0].token_ids) >= 4:
                stream.abort()
                return None
        return last.outputs[0].token_ids

    async def main() -> list:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        got = asyncio.run(main())
        for i, tokens in enumerate(got):
            assert tokens == (None if i == 2 else expected[i]), i
        deadline = time.monotonic() + 10
        while engine.stats().num_unfinished_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine.stats()
        assert stats.num_unfinished_requests == 0 and stats.kv_cache_usage == 0
    finally:
        engine.shutdown()


def test_a_failing_step_reports_its_own_error(demo_model_dir) -> None:  # noqa: ANN001
    """With overlap, the model's error surfaces from step() (and the caller's generate)
    once the helper's scheduling ahead has finished: nothing is left running."""
    llm = LLM(model=str(demo_model_dir), dtype="float32", max_model_len=256,
              overlap_scheduling=True)
    engine = llm.engine
    real_run, calls = engine.runner.run, []

    def run(step):  # noqa: ANN001, ANN202
        calls.append(step)
        if len(calls) == 3:
            raise RuntimeError("the model failed")
        return real_run(step)

    engine.runner.run = run
    try:
        with pytest.raises(RuntimeError, match="the model failed"):
            llm.generate(["Hello", "Hi there"], SamplingParams(temperature=0, max_tokens=8),
                         use_tqdm=False)
        assert engine._helper._work_queue.empty()
    finally:
        engine.close()
