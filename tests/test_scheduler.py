"""Scheduler: token budget, running before waiting, chunked prefill, prefix hits, preemption
order, online/offline, priorities, siblings, aborts, stop conditions, validation, and a long
randomized simulation against a fake paged "model" that checks every step's invariants.

The fake model keeps a real paged KV store (slot -> token). It writes each fed token into the
slot its block table names and, to sample, reads the whole context back through the block
table: a request that shares a wrong block, or whose block another request overwrote, reads
the wrong tokens and the test fails. Its next token is a hash of the context, so a request's
outputs are fixed by its prompt alone: alone, batched or preempted, they must be the same.
"""

from __future__ import annotations

import random
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from xllm.ops import block_pool as bp
from xllm.sampling_params import SamplingParams
from xllm.scheduler import (
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from xllm.scheduler.policy import WaitingQueue, outranks

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50


def next_token(context: list[int]) -> int:
    h = len(context)
    for t in context:
        h = (h * 1000003 + t) & 0xFFFFFFFF
    return (h >> 7) % VOCAB


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 64,
    seqs: int = 16,
    max_model_len: int = 256,
    prefix: bool = True,
    native: bool = True,
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        block_size=block_size,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix,
    )
    return Scheduler(cfg, bp.make_block_pool(num_blocks, native=native))


def mk(
    rid: str,
    prompt: list[int] | int,
    max_tokens: int | None = 8,
    t: float = 0.0,
    eos: frozenset[int] = frozenset(),
    **kw: object,
) -> Request:
    if isinstance(prompt, int):
        seed = zlib.crc32(rid.encode())  # distinct prompts for distinct ids: no accidental hits
        prompt = [(seed >> (i % 24) ^ 7 * i) % VOCAB for i in range(prompt)]
    sp_keys = {"min_tokens", "stop_token_ids", "ignore_eos"}
    sp = SamplingParams(max_tokens=max_tokens, **{k: v for k, v in kw.items() if k in sp_keys})
    rest = {k: v for k, v in kw.items() if k not in sp_keys}
    return Request(rid, prompt, sp, eos_token_ids=eos, arrival_time=t, **rest)  # type: ignore[arg-type]


def reference(r: Request, max_seq_len: int) -> list[int]:
    """r's outputs when generated alone, one token at a time, with its stop conditions."""
    sp, tokens, out = r.sampling_params, list(r.prompt_token_ids), []
    while True:
        tok = next_token(tokens)
        tokens.append(tok)
        out.append(tok)
        if len(out) >= sp.min_tokens and (
            (not sp.ignore_eos and tok in r.eos_token_ids) or tok in sp.stop_token_ids
        ):
            return out
        if (sp.max_tokens is not None and len(out) >= sp.max_tokens) or len(tokens) >= max_seq_len:
            return out


class FakeModel:
    """Runs a step over a paged KV store and checks the scheduler's invariants."""

    def __init__(self, sched: Scheduler, before_update: Callable[[], None] | None = None) -> None:
        self.s = sched
        self.before_update = before_update  # e.g. aborts arriving while the model runs
        self.bs = sched.block_size
        self.kv: dict[int, int] = {}  # slot -> token written there
        self.next_pos: dict[str, int] = {}  # request id -> first position not yet fed
        self.steps = 0

    def check_blocks(self) -> None:
        pool = self.s.kv.pool
        holders = Counter(b for r in self.s.running_requests() for b in r.block_ids)
        for b, n in holders.items():
            assert pool.ref_count(b) == n, (b, n)
        assert pool.num_free_blocks + len(holders) == pool.num_blocks - 1

    def check_policy(self, out: SchedulerOutput) -> None:
        """Who ran and who was preempted respects online/offline and priority."""
        s = self.s
        running = s.running_requests()
        assert s.num_running + s.num_waiting == len(s.requests)
        for rid in out.preempted_ids:  # never preempted while something it outranks runs
            victim = s.get_request(rid)
            if victim is not None:
                assert not any(outranks(victim, r) for r in running), rid
        ids = {x.request_id for x in out.scheduled}
        if any(x.request.offline for x in out.scheduled):  # offline got leftovers only
            assert all(r.request_id in ids for r in running if not r.offline)
        if any(x.request.offline and x.is_new for x in out.scheduled):
            assert len(s._waiting[0]) == 0  # no online request left queued

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        s, bs = self.s, self.bs
        out = s.schedule()
        self.steps += 1
        cfg = s.config
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert s.num_running <= cfg.max_num_seqs
        assert all(x.num_new_tokens == 1 and x.samples for x in out.decodes)
        assert len({x.request_id for x in out.scheduled}) == len(out.scheduled)
        for rid in out.preempted_ids:
            self.next_pos.pop(rid, None)
        self.check_blocks()
        self.check_policy(out)
        sampled = []
        for x in out.scheduled:
            r, start, n = x.request, x.num_computed_tokens, x.num_new_tokens
            assert r.status is RequestStatus.RUNNING and n >= 1
            if x.is_new:  # (re)computation starts after the prefix hit, block aligned
                assert r.request_id not in self.next_pos and start % bs == 0
                assert start < r.num_tokens
            else:
                assert self.next_pos[r.request_id] == start  # each position fed once
            self.next_pos[r.request_id] = start + n
            assert len(r.block_ids) * bs >= start + n
            assert x.samples == (start + n == r.num_tokens)
            pool = s.kv.pool
            for p in range(start, start + n):
                block = r.block_ids[p // bs]
                assert pool.ref_count(block) == 1 and pool.block_hash(block) is None
                self.kv[block * bs + p % bs] = r.all_token_ids[p]
            if x.samples:
                ctx = [self.kv[r.block_ids[p // bs] * bs + p % bs] for p in range(r.num_tokens)]
                assert ctx == r.all_token_ids
                sampled.append([next_token(ctx)])
            else:
                sampled.append([])
        if self.before_update is not None:
            self.before_update()
        finished = s.update_from_output(out, sampled)
        for r in finished:
            self.next_pos.pop(r.request_id, None)
            assert r.block_ids == []
        self.check_blocks()
        return out, finished

    def run(self, max_steps: int = 10_000) -> list[Request]:
        done = []
        while self.s.has_unfinished_requests():
            assert self.steps < max_steps, "requests never finished"
            done += self.step()[1]
        assert self.s.kv.pool.num_free_blocks == self.s.kv.pool.num_blocks - 1
        return done


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(x.request_id, x.num_computed_tokens, x.num_new_tokens) for x in out.scheduled]


# ---- budget, order, chunking ---------------------------------------------------------


def test_chunked_prefill_exact_chunks() -> None:
    s = make(budget=8)
    m = FakeModel(s)
    s.add_request(mk("a", 25, max_tokens=3))
    chunks = [plan(m.step()[0]) for _ in range(5)]
    assert chunks == [
        [("a", 0, 8)],
        [("a", 8, 8)],
        [("a", 16, 8)],
        [("a", 24, 1)],  # the prompt's last token: samples
        [("a", 25, 1)],  # decode
    ]


def test_running_before_waiting_and_budget_split() -> None:
    s = make(budget=10)
    m = FakeModel(s)
    for i in range(3):
        s.add_request(mk(f"r{i}", 3, max_tokens=20, t=i))
    out, _ = m.step()
    assert plan(out) == [("r0", 0, 3), ("r1", 0, 3), ("r2", 0, 3)]
    s.add_request(mk("w", 20, max_tokens=4, t=5))
    out, _ = m.step()  # 3 decodes first, then 7 prompt tokens of w
    assert [x.request_id for x in out.decodes] == ["r0", "r1", "r2"]
    assert plan(out)[3:] == [("w", 0, 7)] and out.num_batched_tokens == 10
    out, _ = m.step()
    assert plan(out) == [("r0", 4, 1), ("r1", 4, 1), ("r2", 4, 1), ("w", 7, 7)]


def test_max_num_seqs_caps_running_set() -> None:
    s = make(seqs=2)
    m = FakeModel(s)
    for i in range(3):
        s.add_request(mk(f"r{i}", 4, max_tokens=2, t=i))
    assert [x.request_id for x in m.step()[0].scheduled] == ["r0", "r1"]
    assert s.num_running == 2 and s.num_waiting == 1
    m.step()  # r0, r1 finish (max_tokens 2)
    assert [x.request_id for x in m.step()[0].scheduled] == ["r2"]


# ---- prefix cache ----------------------------------------------------------------------


def test_prefix_hit_across_requests_exact_blocks() -> None:
    s = make()
    m = FakeModel(s)
    prompt = list(range(10, 20))  # 2 full blocks + 2 tokens
    s.add_request(mk("a", prompt))
    m.step()
    a = s.get_request("a")
    assert a is not None and a.block_ids == [1, 2, 3]
    s.add_request(mk("b", prompt))
    out, _ = m.step()
    b = out.prefills[0]
    assert (b.request_id, b.num_computed_tokens, b.num_new_tokens, b.is_new) == ("b", 8, 2, True)
    assert b.request.block_ids == [1, 2, 4] and b.new_block_ids == [4]
    assert b.request.num_cached_tokens == 8
    pool = s.kv.pool
    assert [pool.ref_count(x) for x in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert s.prefix_cache_hit_rate == pytest.approx(8 / 20)
    done = {r.request_id: r.output_token_ids for r in m.run()}
    assert done["a"] == done["b"] == reference(mk("x", prompt), s.max_seq_len)


def test_siblings_share_prompt_blocks() -> None:
    s = make(budget=64)
    m = FakeModel(s)
    prompt = list(range(30, 40))
    s.add_request(mk("p0", prompt))
    for i in (1, 2):
        s.add_request(mk(f"p{i}", prompt, share_prefix_with="p0"))
    assert s.num_waiting == 3
    out, _ = m.step()
    assert plan(out) == [("p0", 0, 10)]  # the siblings wait for p0's prompt blocks
    out, _ = m.step()
    assert plan(out) == [("p0", 10, 1), ("p1", 8, 2), ("p2", 8, 2)]
    shared = s.get_request("p0").block_ids[:2]  # type: ignore[union-attr]
    assert [s.kv.pool.ref_count(b) for b in shared] == [3, 3]
    tails = {s.get_request(f"p{i}").block_ids[2] for i in range(3)}  # type: ignore[union-attr]
    assert len(tails) == 3  # the partial last block is each one's own
    m.run()


def test_sibling_released_when_leader_aborted() -> None:
    s = make(budget=4)
    m = FakeModel(s)
    prompt = list(range(5, 15))
    s.add_request(mk("p0", prompt))
    s.add_request(mk("p1", prompt, share_prefix_with="p0"))
    assert plan(m.step()[0]) == [("p0", 0, 4)]
    s.abort_requests(["p0"])
    assert plan(m.step()[0]) == [("p1", 4, 4)]  # p0's first block was cached: a hit
    m.run()


# ---- preemption ----------------------------------------------------------------------


def test_preemption_order_offline_then_priority_then_arrival() -> None:
    # 5 usable blocks, 5 one-block prompts: the first decode past the block runs dry.
    s = make(num_blocks=6, block_size=4, budget=64)
    m = FakeModel(s)
    reqs = [
        mk("A", 4, max_tokens=6, t=0.0),
        mk("B", 4, max_tokens=6, t=1.0),
        mk("C", 4, max_tokens=6, t=0.5, priority=1),
        mk("D", 4, max_tokens=6, t=0.0, priority=-5, offline=True),
        mk("E", 4, max_tokens=6, t=2.0, priority=1),
    ]
    for r in reqs:
        s.add_request(r)
    assert [x.request_id for x in m.step()[0].scheduled] == ["A", "B", "C", "E", "D"]
    out, _ = m.step()
    # A takes D's block (offline goes first), B takes E's (priority 1, later than C);
    # C is then the least important itself: it steps back and the step ends.
    assert out.preempted_ids == ["D", "E", "C"]
    assert plan(out) == [("A", 4, 1), ("B", 4, 1)]
    assert s.num_preempted == 3 and s.num_waiting == 3
    assert [s.get_request(x).num_preemptions for x in "CDE"] == [1, 1, 1]  # type: ignore[union-attr]
    done = {r.request_id: r for r in m.run()}
    for r in reqs:
        assert done[r.request_id].output_token_ids == reference(r, s.max_seq_len)


def test_running_request_never_preempts_more_important() -> None:
    s = make(num_blocks=3, block_size=4)  # 2 usable blocks
    m = FakeModel(s)
    s.add_request(mk("hi", 4, max_tokens=5, t=1.0))
    s.add_request(mk("lo", 4, max_tokens=5, t=0.0, priority=3))
    m.step()
    out, _ = m.step()
    assert out.preempted_ids == ["lo"] and plan(out) == [("hi", 4, 1)]
    m.run()


def test_waiting_preempts_only_what_it_outranks() -> None:
    s = make(num_blocks=5, block_size=4)  # 4 usable blocks
    m = FakeModel(s)
    s.add_request(mk("old", 12, max_tokens=30, t=0.0, priority=1))
    m.step()  # holds 3 blocks (12 prompt tokens) -> 4 with its first decode
    m.step()
    s.add_request(mk("same", 8, t=1.0, priority=1))  # same priority: waits
    out, _ = m.step()
    assert out.preempted_ids == [] and plan(out) == [("old", 13, 1)]
    s.add_request(mk("urgent", 8, t=2.0, priority=0))  # outranks old: preempts it
    out, _ = m.step()
    assert out.preempted_ids == ["old"]
    assert [x.request_id for x in out.scheduled] == ["urgent"]
    m.run()


def test_admission_that_releases_a_more_important_sibling() -> None:
    """Preempting a leader during an admission queues its deferred sibling, here ahead of
    the request being admitted: the queue must still remove the admitted one."""
    s = make(num_blocks=4, block_size=4, budget=7)  # 3 usable blocks
    m = FakeModel(s)
    prompt = list(range(1, 10))
    s.add_request(mk("L", prompt, priority=5))
    s.add_request(mk("S", prompt, priority=0, share_prefix_with="L"))
    assert plan(m.step()[0]) == [("L", 0, 7)]  # S waits for L's first 8 tokens
    s.add_request(mk("W", 4, priority=1))
    out, _ = m.step()
    assert out.preempted_ids == ["L"]
    assert out.scheduled[0].request_id == "W"
    done = {r.request_id: r for r in m.run()}
    for r in done.values():
        assert r.output_token_ids == reference(r, s.max_seq_len)


def test_waiting_admitted_by_priority_then_arrival() -> None:
    s = make(budget=4, seqs=1)
    m = FakeModel(s)
    for rid, prio, t in [("c", 2, 0.0), ("a", 0, 3.0), ("b", 0, 4.0), ("z", 1, 1.0)]:
        s.add_request(mk(rid, 3, max_tokens=1, t=t, priority=prio))
    order = [m.step()[0].scheduled[0].request_id for _ in range(4)]
    assert order == ["a", "b", "z", "c"]


def test_waiting_queue_order_and_lazy_removal() -> None:
    q = WaitingQueue()
    reqs = [mk(f"r{i}", 2, t=float(i % 7), priority=i % 3) for i in range(300)]
    for i, r in enumerate(reqs):
        r.seq = i
        q.push(r)
    with pytest.raises(ValueError, match="already queued"):
        q.push(reqs[0])
    gone = set(range(0, 300, 2)) | {1}
    for i in sorted(gone):
        assert q.discard(reqs[i])
    assert not q.discard(reqs[0]) and len(q) == 149
    assert len(q._heap) < 300  # compacted once dead entries outnumbered live ones
    q.remove(reqs[299])  # not the head: lazily
    with pytest.raises(ValueError, match="not queued"):
        q.remove(reqs[299])
    expect = sorted(
        (r for i, r in enumerate(reqs) if i not in gone and i != 299),
        key=lambda r: (r.priority, r.arrival_time, r.seq),
    )
    got = []
    while (head := q.peek()) is not None:
        q.remove(head)
        got.append(head)
    assert got == expect and len(q) == 0


def test_stats() -> None:
    s = make(num_blocks=11, block_size=4, budget=8)
    m = FakeModel(s)
    prompt = list(range(9))
    s.add_request(mk("a", prompt, max_tokens=3))
    s.add_request(mk("b", prompt, max_tokens=3, t=1.0))
    m.step()  # a: 8 tokens
    st = s.stats()
    assert (st.num_running, st.num_waiting, st.num_preempted) == (1, 1, 0)
    assert st.kv_cache_usage == pytest.approx(0.2) == s.kv_cache_usage
    m.step()  # a: last prompt token; b: 8-token hit + 1
    st = s.stats()
    assert (st.prefix_cache_queried_tokens, st.prefix_cache_hit_tokens) == (18, 8)
    assert st.prefix_cache_hit_rate == pytest.approx(8 / 18) == s.prefix_cache_hit_rate
    assert s.get_request("b").num_cached_tokens == 8  # type: ignore[union-attr]
    m.run()
    assert s.stats().kv_cache_usage == 0.0


# ---- online / offline ------------------------------------------------------------------


def test_offline_gets_only_leftover_budget() -> None:
    s = make(budget=8)
    m = FakeModel(s)
    s.add_request(mk("off", 20, max_tokens=4, t=0.0, offline=True))
    s.add_request(mk("on", 6, max_tokens=4, t=1.0))
    assert plan(m.step()[0]) == [("on", 0, 6), ("off", 0, 2)]
    s.add_request(mk("on2", 5, max_tokens=4, t=2.0))
    # online running (1), online waiting (5), then offline running gets the last 2
    assert plan(m.step()[0]) == [("on", 6, 1), ("on2", 0, 5), ("off", 2, 2)]
    assert plan(m.step()[0]) == [("on", 7, 1), ("on2", 5, 1), ("off", 4, 6)]
    m.run()


def test_online_arrival_preempts_offline_for_blocks() -> None:
    s = make(num_blocks=7, block_size=4)  # 6 usable blocks
    m = FakeModel(s)
    s.add_request(mk("f1", 8, max_tokens=20, t=0.0, offline=True))
    s.add_request(mk("f2", 8, max_tokens=20, t=1.0, offline=True))
    m.step()
    m.step()
    assert s.kv.pool.num_free_blocks == 0  # 3 blocks each after their first decode
    s.add_request(mk("on", 6, max_tokens=3, t=5.0))
    out, _ = m.step()
    assert out.preempted_ids == ["f2"]  # the later offline request
    assert plan(out) == [("f1", 9, 1), ("on", 0, 6)]
    done = {r.request_id: r for r in m.run()}
    for rid in ("f1", "f2", "on"):
        assert done[rid].output_token_ids == reference(done[rid], s.max_seq_len)
    assert done["f2"].num_preemptions == 1 and s.num_preempted == 1


def test_online_arrival_takes_offline_seat_but_not_the_reverse() -> None:
    s = make(seqs=2)
    m = FakeModel(s)
    s.add_request(mk("f1", 4, max_tokens=20, t=0.0, offline=True))
    s.add_request(mk("f2", 4, max_tokens=20, t=1.0, offline=True))
    m.step()
    s.add_request(mk("on1", 4, max_tokens=20, t=2.0))
    out, _ = m.step()
    assert out.preempted_ids == ["f2"] and plan(out) == [("f1", 4, 1), ("on1", 0, 4)]
    s.add_request(mk("on2", 4, max_tokens=20, t=3.0))
    out, _ = m.step()
    assert out.preempted_ids == ["f1"] and plan(out) == [("on1", 4, 1), ("on2", 0, 4)]
    s.add_request(mk("f3", 4, max_tokens=3, t=4.0, offline=True, priority=-9))
    for _ in range(3):  # no seat for offline work while online work holds them all
        out, _ = m.step()
        assert out.preempted_ids == [] and [x.request_id for x in out.scheduled] == ["on1", "on2"]
    m.run()


def test_offline_waiting_cannot_preempt_online() -> None:
    s = make(num_blocks=4, block_size=4)  # 3 usable
    m = FakeModel(s)
    s.add_request(mk("on", 10, max_tokens=2, t=0.0))
    m.step()
    s.add_request(mk("off", 8, max_tokens=2, t=0.0, offline=True, priority=-100))
    out, _ = m.step()
    assert out.preempted_ids == [] and plan(out) == [("on", 10, 1)]
    m.run()


# ---- abort, finish, stop conditions ------------------------------------------------------


def test_abort_frees_blocks_at_once() -> None:
    s = make(num_blocks=16)
    m = FakeModel(s)
    free0 = s.kv.pool.num_free_blocks
    s.add_request(mk("a", 10, max_tokens=50))
    s.add_request(mk("w", 10, max_tokens=50, offline=True))
    m.step()
    assert s.kv.pool.num_free_blocks == free0 - 6
    out = s.schedule()  # aborted mid-step: blocks back at once, its result ignored
    assert [r.request_id for r in s.abort_requests(["a", "nope"])] == ["a"]
    assert s.kv.pool.num_free_blocks == free0 - 3
    s.update_from_output(out, [[1] for _ in out.scheduled])
    a = next(x.request for x in out.scheduled if x.request_id == "a")
    assert a.finish_reason == "abort" and a.output_token_ids == [next_token(a.prompt_token_ids)]
    assert s.abort_requests("w")[0].status is RequestStatus.FINISHED_ABORTED
    assert s.kv.pool.num_free_blocks == free0 and not s.has_unfinished_requests()
    s.add_request(mk("q", 4))  # aborting a waiting request: out of the queue at once
    s.abort_requests(["q"])
    assert (s.num_waiting, s.num_running) == (0, 0)
    assert s.schedule().is_empty


def drive(s: Scheduler, tokens: list[int]) -> list[Request]:
    """Feeds tokens to the only request, one per sampling step."""
    finished: list[Request] = []
    it = iter(tokens)
    while s.has_unfinished_requests():
        out = s.schedule()
        finished += s.update_from_output(
            out, [[next(it)] if x.samples else [] for x in out.scheduled]
        )
    return finished


@pytest.mark.parametrize(
    "kw, tokens, n_out, reason, stop_reason",
    [
        ({"eos": frozenset({2})}, [5, 2, 9], 2, "stop", None),
        ({"eos": frozenset({2}), "ignore_eos": True}, [2, 2, 2, 2], 4, "length", None),
        ({"stop_token_ids": [7]}, [5, 7, 9], 2, "stop", 7),
        ({"eos": frozenset({2}), "stop_token_ids": [7], "ignore_eos": True}, [2, 7], 2, "stop", 7),
        ({"eos": frozenset({2}), "min_tokens": 3}, [2, 2, 2, 9], 3, "stop", None),
        ({"stop_token_ids": [7], "min_tokens": 2}, [7, 1, 7], 3, "stop", 7),
        ({"max_tokens": 2, "eos": frozenset({2})}, [1, 1, 2], 2, "length", None),
        ({"max_tokens": 2, "eos": frozenset({2})}, [1, 2], 2, "stop", None),  # stop wins
        ({"max_tokens": None}, [1] * 30, 14, "length", None),  # max_model_len 20
    ],
)
def test_stop_conditions(
    kw: dict, tokens: list[int], n_out: int, reason: str, stop_reason: int | None
) -> None:
    s = make(max_model_len=20)
    kw = dict(kw)
    max_tokens = kw.pop("max_tokens", 4)
    s.add_request(mk("r", 6, max_tokens=max_tokens, **kw))
    (r,) = drive(s, tokens)
    assert r.output_token_ids == tokens[:n_out]
    assert (r.finish_reason, r.stop_reason) == (reason, stop_reason)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks - 1


def test_length_capped_by_kv_capacity() -> None:
    s = make(num_blocks=4, block_size=4, max_model_len=100)  # 3 blocks hold 12 tokens
    assert s.max_seq_len == 12
    s.add_request(mk("r", 10, max_tokens=None))
    (r,) = drive(s, [1] * 5)
    assert (r.num_tokens, r.finish_reason) == (12, "length")


def test_resumed_request_continues_its_outputs() -> None:
    """A request resumed from another engine arrives with outputs: prompt and outputs are
    computed together (as after a preemption), and max_tokens counts them."""
    s = make()
    m = FakeModel(s)
    whole = mk("w", 10, max_tokens=9)
    s.add_request(whole)
    m.run()
    resumed = mk("w2", whole.prompt_token_ids, max_tokens=9)
    for t in whole.output_token_ids[:4]:
        resumed.append_output_token(t)
    s.add_request(resumed)
    out, _ = m.step()
    assert plan(out) == [("w2", 12, 2)]  # 14 tokens; 12 (3 blocks) were a prefix-cache hit
    m.run()
    assert resumed.output_token_ids == whole.output_token_ids
    assert (resumed.num_output_tokens, resumed.finish_reason) == (9, "length")
    long = mk("long", 18)
    long.append_output_token(1)
    long.append_output_token(2)
    with pytest.raises(ValueError, match="has 20 tokens"):
        make(max_model_len=19).add_request(long)


def test_finish_requests_for_stop_strings() -> None:
    s = make()
    s.add_request(mk("r", 6, max_tokens=10))
    out = s.schedule()
    s.update_from_output(out, [[3]])
    (r,) = s.finish_requests(["r"], "stop", stop_reason="\n\n")
    assert (r.finish_reason, r.stop_reason, r.block_ids) == ("stop", "\n\n", [])
    assert s.finish_requests(["r"], "stop") == []  # already gone: ignored
    with pytest.raises(ValueError, match="reason must be one of"):
        s.finish_requests(["x"], "eos")


# ---- validation ------------------------------------------------------------------------


def test_add_request_validation() -> None:
    s = make(num_blocks=5, block_size=4, max_model_len=20)  # 4 usable blocks = 16 tokens
    with pytest.raises(ValueError, match=r"prompt has 21 tokens, more than max_model_len = 20"):
        s.add_request(mk("long", 21))
    with pytest.raises(ValueError, match=r"17 tokens needs 5 KV blocks of 4 tokens.*only 4"):
        s.add_request(mk("big", 17))
    s.add_request(mk("a", 16))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(mk("a", 3))
    r = mk("b", 3)
    s.add_request(r)
    s.abort_requests(["b"])
    with pytest.raises(ValueError, match="already added"):
        s.add_request(r)
    with pytest.raises(ValueError, match="must be a Request"):
        s.add_request("c")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_blocks": 1}, "num_blocks must be an integer >= 2"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 2.5}, "max_num_batched_tokens"),
        ({"max_model_len": -1}, "max_model_len"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching must be a bool"),
    ],
)
def test_config_validation(kw: dict, match: str) -> None:
    args = {"num_blocks": 8, "max_model_len": 64, **kw}
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**args)


def test_request_and_pool_validation() -> None:
    sp = SamplingParams()
    for args, match in [
        (("", [1], sp), "request_id"),
        (("a", [], sp), "must not be empty"),
        (("a", [1, -2], sp), r"prompt_token_ids\[1\]"),
        (("a", [1], {}), "sampling_params"),
    ]:
        with pytest.raises(ValueError, match=match):
            Request(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        Request("a", [1], sp, priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offline"):
        Request("a", [1], sp, offline=None)  # type: ignore[arg-type]
    cfg = SchedulerConfig(num_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="block_pool has 9 blocks"):
        Scheduler(cfg, bp.PyBlockPool(9))


def test_update_from_output_validation() -> None:
    s = make(budget=4)
    s.add_request(mk("a", 6))
    out = s.schedule()
    with pytest.raises(RuntimeError, match="before update_from_output"):
        s.schedule()
    with pytest.raises(ValueError, match="has 0 entries"):
        s.update_from_output(out, [])
    with pytest.raises(ValueError, match=r"must be \[\]"):
        s.update_from_output(out, [[1]])  # a partial prefill does not sample
    s.update_from_output(out, [[]])
    with pytest.raises(ValueError, match="consumed only once"):
        s.update_from_output(out, [[]])
    out = s.schedule()
    with pytest.raises(ValueError, match="hold the sampled token"):
        s.update_from_output(out, [[]])
    with pytest.raises(ValueError, match="non-negative ints"):
        s.update_from_output(out, [[-1]])
    assert s.get_request("a").num_computed_tokens == 4  # type: ignore[union-attr]
    s.update_from_output(out, [[1]])
    assert s.get_request("a").num_computed_tokens == 6  # type: ignore[union-attr]


def test_import_leaves_torch_out() -> None:
    code = "import sys, xllm.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


# ---- randomized simulation ---------------------------------------------------------------


@pytest.mark.parametrize("seed, native", [(0, True), (1, True), (2, False), (3, True)])
def test_randomized_simulation(seed: int, native: bool) -> None:
    rng = random.Random(seed)
    s = make(
        num_blocks=rng.choice([10, 14, 20]),
        block_size=rng.choice([2, 4]),
        budget=rng.choice([5, 16, 40]),
        seqs=rng.choice([3, 6, 32]),
        max_model_len=48,
        prefix=seed != 3,
        native=native,
    )
    aborted: set[str] = set()

    def abort_mid_step() -> None:
        if s.requests and rng.random() < 0.02:
            victim = rng.choice(list(s.requests))
            s.abort_requests([victim])
            aborted.add(victim)

    m = FakeModel(s, abort_mid_step)
    usable = s.config.num_usable_blocks * s.block_size
    shared = [[rng.randrange(VOCAB) for _ in range(12)] for _ in range(3)]  # common prefixes
    pending = 120
    added: dict[str, Request] = {}
    while pending or s.has_unfinished_requests():
        assert m.steps < 20_000
        for _ in range(rng.choice([0, 0, 1, 2])):
            if not pending:
                break
            pending -= 1
            rid = f"q{pending}"
            n = rng.randint(1, min(usable, 36))
            prompt = rng.choice(shared)[: rng.randint(0, 12)] if rng.random() < 0.5 else []
            prompt = (prompt + [rng.randrange(VOCAB) for _ in range(n)])[:n]
            leader = rng.choice(list(added)) if added and rng.random() < 0.2 else None
            priority, offline = rng.choice([0, 0, 1, 5]), rng.random() < 0.3
            if leader is not None:  # n > 1: same prompt, class and priority as the first
                lead = added[leader]
                prompt, priority, offline = list(lead.prompt_token_ids), lead.priority, lead.offline
            r = mk(
                rid,
                prompt,
                max_tokens=(mt := rng.choice([1, 3, 10, 40, None])),
                t=m.steps + rng.random(),
                eos=frozenset({0}),
                ignore_eos=rng.random() < 0.3,
                min_tokens=min(rng.choice([0, 0, 2]), mt or 2),
                stop_token_ids=rng.choice([[], [1, 2]]),
                priority=priority,
                offline=offline,
                share_prefix_with=leader,
            )
            s.add_request(r)
            added[rid] = r
        if s.has_unfinished_requests() and rng.random() < 0.03:
            victim = rng.choice(list(s.requests))
            s.abort_requests([victim])
            aborted.add(victim)
        if s.has_unfinished_requests():
            m.step()
    assert s.num_waiting == s.num_running == 0
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks - 1
    for rid, r in added.items():
        ref = reference(r, s.max_seq_len)
        if rid in aborted:
            assert r.finish_reason == "abort" and ref[: r.num_output_tokens] == r.output_token_ids
        else:
            assert r.output_token_ids == ref, rid
    assert s.num_preempted > 0  # the tiny pool forced preemption
    if seed != 3:
        assert s.prefix_cache_hit_rate > 0
