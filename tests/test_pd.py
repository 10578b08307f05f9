"""Prefill/decode disaggregation, first slice: a prefill instance computes the prompt and
the first token and holds the prompt's KV; a decode instance fetches it and decodes the
rest; the client sees one stream, token-identical to a mixed instance's (greedy and
seeded). Missing roles fall back to whole requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from xllm import SamplingParams
from xllm.service.master import pd_candidates
from xllm.service.registry import EmbeddedRegistry
from xllm.service.state import Capacity, InstanceInfo

pytestmark = pytest.mark.timeout(180)

DOC = "Two lighthouses stood on the cape, and their keepers traded letters every week. " * 8


async def _tokens(engine, prompts: list[list[int]], params: SamplingParams  # noqa: ANN001
                  ) -> list[list[int]]:
    """Each prompt's tokens from ``engine`` alone, one after another."""
    out = []
    for p in prompts:
        out.append([o async for o in engine.generate(p, params)][-1].outputs[0].token_ids)
    return out


def _staggered(master, prompts: list[list[int]], params: SamplingParams  # noqa: ANN001
               ) -> list[asyncio.Future[list[int]]]:
    """The prompts sent to the cluster 50 ms apart; each future ends with its tokens."""
    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.05 * i)
        outs = [o async for o in master.generate(prompts[i], params)]
        return outs[-1].outputs[0].token_ids

    return [asyncio.ensure_future(one(i)) for i in range(len(prompts))]


def test_roles_pick_where_a_flight_goes() -> None:
    reg = EmbeddedRegistry()
    views = {role: reg.register(InstanceInfo(role, f"127.0.0.1:{i + 1}", role=role,
                                             capacity=Capacity(8)))
             for i, role in enumerate(("prefill", "decode", "mixed"))}
    every = list(views.values())
    assert pd_candidates(every, False, 8) == ("prefill", [views["prefill"]])
    assert pd_candidates(every, True, 8) == ("decode", [views["decode"]])
    # no decode instance: whoever is there decodes; no prefill instance: whole requests
    assert pd_candidates([views["prefill"]], True, 8) == ("", [views["prefill"]])
    only = [views["decode"], views["mixed"]]
    assert pd_candidates(only, False, 8) == ("", only)
    assert pd_candidates(every, False, 1) == ("", every)  # one token: nothing to hand on
    assert pd_candidates(every, False, None) == ("prefill", [views["prefill"]])

def test_overflow_sends_a_late_prompt_whole_to_a_decode_instance() -> None:
    """With a TTFT SLO, a new request goes whole to a decode instance when the prefill
    instance would start it too late and the decode instance has the time; otherwise it
    keeps to the roles."""
    from xllm.engine.speed_model import SpeedModel
    from xllm.service.master import pd_overflow

    reg = EmbeddedRegistry()
    p = reg.register(InstanceInfo("p", "127.0.0.1:1", role="prefill", capacity=Capacity(8)))
    d = reg.register(InstanceInfo("d", "127.0.0.1:2", role="decode", capacity=Capacity(8)))
    every = [p, d]
    speed = SpeedModel(ttft_coef=(0.0, 0.5, 0.0), tpot_coef=(20.0, 1.0, 0.0))  # 0.5 ms a token
    p.load.speed = speed
    d.load.tpot_ms = 30.0
    slo = dict(slo_ttft_ms=2000.0, slo_tpot_ms=60.0)
    # An idle prefill instance: 500 ms for 1000 tokens, within the SLO.
    assert pd_candidates(every, False, 128, 1000, **slo) == ("prefill", [p])
    # 4000 tokens queued there: 2.5 s > 2 s; the decode instance starts it in 0.53 s and its
    # decodes' TPOT grows by 500 ms / 128 tokens to ~34 ms.
    p.load.num_waiting_prefill_tokens = 4000
    assert pd_overflow([p], [d], 1000, 128, 2000.0, 60.0) == [d]
    assert pd_candidates(every, False, 128, 1000, **slo) == ("overflow", [d])
    # ... not when that would push its TPOT past the SLO (short outputs spread the stall less)
    assert pd_candidates(every, False, 16, 1000, **slo) == ("prefill", [p])
    d.load.tpot_ms = 58.0
    assert pd_candidates(every, False, 128, 1000, **slo) == ("prefill", [p])
    d.load.tpot_ms = 30.0
    # ... nor when the decode instance has as much queued (routed to it since its report)
    d.pending_prefill_tokens = 4000
    assert pd_candidates(every, False, 128, 1000, **slo) == ("prefill", [p])
    d.pending_prefill_tokens = 0
    # ... nor when prompts sent to it by overflow lately have used its TPOT headroom: 8000
    # tokens (4 s of stalls) over 128 tokens would put its decodes at ~66 ms
    assert pd_candidates(every, False, 128, 1000, **slo, recent_overflow={"d": 8000}) == (
        "prefill", [p])
    assert pd_candidates(every, False, 128, 1000, **slo, recent_overflow={"d": 1000}) == (
        "overflow", [d])
    # No SLO, a request already started, or nothing to predict with: the roles.
    assert pd_candidates(every, False, 128, 1000) == ("prefill", [p])
    assert pd_candidates(every, True, 128, 1000, **slo) == ("decode", [d])
    p.load.speed = None
    assert pd_candidates(every, False, 128, 1000, **slo) == ("prefill", [p])
    # the measured prompt throughput stands in for a speed model
    p.load.prefill_tokens_per_s = 1000.0
    assert pd_candidates(every, False, 128, 1000, **slo) == ("overflow", [d])


def test_prefill_then_decode_equals_a_mixed_instance(demo_model_dir: Path) -> None:
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=96, num_threads=1)
    cases = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12,
                            min_tokens=6)]  # EOS held back past the prefill's token

    async def run(prefill, decode, mixed) -> None:  # noqa: ANN001
        tokenizer = mixed.engine.tokenizer
        prompts = [tokenizer.encode(DOC + q) for q in ("Who wrote first?", "What did they trade?")]
        want = []
        for params in cases:
            for prompt in prompts:
                out = [o async for o in mixed.generate(prompt, params)][-1]
                want.append(out.outputs[0].token_ids)
        async with cluster([(prefill, "prefill"), (decode, "decode")]) as (_, master):
            got = []
            for params in cases:
                for prompt in prompts:
                    outs = [o async for o in master.generate(prompt, params)]
                    assert outs[-1].finished
                    got.append(outs[-1].outputs[0].token_ids)
                    # the first token came alone (from the prefill instance), then the rest
                    assert len(outs[0].outputs[0].token_ids) == 1
            assert got == want
            assert master.num_pd_handoffs == len(got) and master.num_resumed == 0
            # the decode instance fetched the first prompt's blocks from the prefill
            # instance (later prompts share most of them: it had them by then)
            assert decode.engine.kv_store.peer_blocks_fetched >= len(prompts[0]) // 16
            assert prefill.engine.kv_store.peer_blocks_served >= len(prompts[0]) // 16
            # the prefill instance let go of every hold once its blocks were fetched (or
            # the decode instance said it had them)
            await asyncio.sleep(0.2)
            fut = prefill.call_on_engine_thread(lambda e: e.scheduler.kv.pool.num_free_blocks)
            assert await asyncio.wrap_future(fut) == prefill.engine.num_kv_blocks - 1

    with engines(cfg, 3) as (prefill, decode, mixed):
        asyncio.run(run(prefill, decode, mixed))


def test_pd_survives_a_prefill_or_decode_instance_failing(demo_model_dir: Path,
                                                          monkeypatch) -> None:  # noqa: ANN001
    """The prefill instance fails before its first token: the request is dispatched again
    (to the decode instance, the only one left). The decode instance fails after two
    tokens: the request resumes (on the prefill instance, the only one left). Both streams
    equal a mixed instance's."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig
    from xllm.service.instance import InstanceServicer

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=96, num_threads=1)
    faults: dict[str, int] = {}  # role -> tokens it sends before failing (once)
    roles: dict[int, str] = {}
    generate = InstanceServicer.Generate

    async def faulty(self, request, context):  # noqa: ANN001, ANN202
        role = roles.get(id(self.engine), "")
        after = faults.pop(role, None)
        sent = 0
        async for msg in generate(self, request, context):
            if after is not None and sent >= after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{role} instance died")
            sent += len(msg.token_ids)
            yield msg

    monkeypatch.setattr(InstanceServicer, "Generate", faulty)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)

    async def run(prefill, decode, mixed) -> None:  # noqa: ANN001
        prompt = mixed.engine.tokenizer.encode(DOC + "Who answered last?")
        want = [o async for o in mixed.generate(prompt, params)][-1]
        roles.update({id(prefill): "prefill", id(decode): "decode"})
        async with cluster([(prefill, "prefill"), (decode, "decode")]) as (_, master):
            for role, after in (("prefill", 0), ("decode", 2)):
                faults[role] = after
                outs = [o async for o in master.generate(prompt, params)]
                assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids, role
                assert role not in faults  # the fault did happen
            assert master.num_resumed == 2

    with engines(cfg, 3) as (prefill, decode, mixed):
        asyncio.run(run(prefill, decode, mixed))


def test_a_decode_instance_dying_resumes_on_another_that_fetches_from_the_prefill(
        demo_model_dir: Path, monkeypatch) -> None:  # noqa: ANN001
    """One prefill and two decode instances: the decode instance that takes the request
    fails after three tokens; the request resumes on the other decode instance, which
    fetches the prompt's KV from the prefill instance (still holding it) rather than
    recomputing it. The stream equals a mixed instance's."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig
    from xllm.service.instance import InstanceServicer

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=96, num_threads=1)
    fail_next = {"decode": True}
    decoders: set[int] = set()
    generate = InstanceServicer.Generate

    async def faulty(self, request, context):  # noqa: ANN001, ANN202
        dies = id(self.engine) in decoders and fail_next.pop("decode", False)
        sent = 0
        async for msg in generate(self, request, context):
            if dies and sent >= 3:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode instance died")
            sent += len(msg.token_ids)
            yield msg

    monkeypatch.setattr(InstanceServicer, "Generate", faulty)
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=12, ignore_eos=True)

    async def run(prefill, d1, d2, mixed) -> None:  # noqa: ANN001
        prompt = mixed.engine.tokenizer.encode(DOC + "Which keeper was older?")
        want = [o async for o in mixed.generate(prompt, params)][-1]
        decoders.update({id(d1), id(d2)})
        members = [(prefill, "prefill"), (d1, "decode"), (d2, "decode")]
        async with cluster(members) as (_, master):
            outs = [o async for o in master.generate(prompt, params)]
            assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
            assert not fail_next and master.num_resumed == 1
            fetched = [d.engine.kv_store.peer_blocks_fetched for d in (d1, d2)]
            # both decode instances fetched the prompt from the prefill instance
            assert min(fetched) >= len(prompt) // 16

    with engines(cfg, 4) as (prefill, d1, d2, mixed):
        asyncio.run(run(prefill, d1, d2, mixed))


def test_a_role_switch_under_load_loses_and_duplicates_nothing(demo_model_dir: Path) -> None:
    """One prefill and two decode instances serve a stream of requests; midway one decode
    instance is switched to prefill (it refuses decode work at once, drains what it holds,
    confirms). Every request completes with a mixed instance's tokens, none twice, and the
    master routes by the new role."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=160, num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    async def run(prefill, d1, d2, mixed) -> None:  # noqa: ANN001
        tok = mixed.engine.tokenizer
        prompts = [tok.encode(f"Letter {i}: " + DOC[: 120 + 40 * i]) for i in range(6)]
        want = await _tokens(mixed, prompts, params)
        members = [(prefill, "prefill"), (d1, "decode"), (d2, "decode")]
        async with cluster(members) as (reg, master):
            tasks = _staggered(master, prompts, params)
            await asyncio.sleep(0.12)
            target = next(v for v in reg.routable() if v.info.role == "decode")
            resp = await master.switch_role(target.instance_id, "prefill", drain_timeout_s=20)
            assert resp.role == "prefill" and resp.still_running == 0
            got = await asyncio.gather(*tasks)
            assert got == want  # each exactly once, each right
            roles = sorted(v.info.role for v in reg.routable())
            assert roles == ["decode", "prefill", "prefill"]
            await asyncio.sleep(0.3)  # a heartbeat confirms it
            assert reg.get(target.instance_id).load.role == "prefill"
            assert master.num_role_switches == 1

    with engines(cfg, 4) as (prefill, d1, d2, mixed):
        asyncio.run(run(prefill, d1, d2, mixed))


def test_dynamic_pd_plans_from_reported_speed_models_and_switches_under_load(
        demo_model_dir: Path) -> None:
    """--pd-policy dynamic: the instances report their speed models in heartbeats; on a
    prefill-heavy traffic the master's planning round moves two mixed instances to 1P:1D
    while requests run. Every request completes with the tokens a lone instance gives,
    and the decision is recorded with its reason and how long the switch took."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig
    from xllm.engine.speed_model import SpeedModel
    from xllm.service.pd import PdController

    model = SpeedModel((0.0, 0.3, 0.0), (10.0, 0.2, 0.0))
    prefill_samples = [(n, model.ttft_ms(n)) for n in (64, 256, 512, 1024)]
    decode_samples = [(b, c, model.tpot_ms(b, c)) for b in (1, 4, 16) for c in (128, 512)]

    step_samples = [(n, 0, 1, n * (n + 1) / 2, 0, model.ttft_ms(n)) for n, _ in prefill_samples]
    step_samples += [(b, b, b, 0.0, b * c, ms) for b, c, ms in decode_samples]

    def seed(engine) -> None:  # noqa: ANN001 - a profile's samples, made up: a known model
        for window in (engine.speed.prefill, engine.speed.decode, engine.speed.prompt_steps,
                       engine.speed.decode_steps):
            window.clear()
        engine.speed.seed(prefill_samples, decode_samples, step_samples)

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=160, num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    async def run(a, b) -> None:  # noqa: ANN001
        tok = a.engine.tokenizer
        prompts = [tok.encode(f"Letter {i}: " + DOC[: 120 + 40 * i]) for i in range(6)]
        want = await _tokens(a, prompts, params)
        for e in (a, b):
            await asyncio.wrap_future(e.call_on_engine_thread(seed))
        pd = PdController("dynamic", slo_ttft_ms=2000, slo_tpot_ms=12, min_dwell_s=0,
                          window_s=10)
        async with cluster([(a, "mixed"), (b, "mixed")], pd=pd) as (reg, master):
            for v in reg.routable():  # reported in the heartbeats
                assert v.load.speed is not None
                assert v.load.speed.ttft_ms(1000) == pytest.approx(300, rel=1e-3)
            for i in range(20):  # the last 10 s: 2 req/s of 1k-token prompts
                pd.meter.arrive(time.monotonic() - 10 + 0.5 * i, 1000, 128)
            tasks = _staggered(master, prompts, params)
            await asyncio.sleep(0.12)
            await master.pd_round()
            record = pd.decisions[-1]
            assert record.target == "1P:1D" and "attainment" in record.reason
            assert record.switch_seconds is not None and not record.errors
            assert sorted(v.info.role for v in reg.routable()) == ["decode", "prefill"]
            assert await asyncio.gather(*tasks) == want  # each exactly once, each right
            assert master.num_role_switches == 2

    with engines(cfg, 2) as (a, b):
        asyncio.run(run(a, b))


def test_a_decode_instance_turning_prefill_hands_its_requests_off(demo_model_dir: Path) -> None:
    """SetRole to prefill with migrate: the decode instance stops its decoding requests at
    once with their KV held; the master resumes each on the other decode instance, which
    fetches the KV of every token so far. Each request completes once with a lone
    instance's tokens (greedy and seeded), and the switch does not wait for them."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                       num_kv_blocks=200, num_threads=1)
    cases = [SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=60,
                            ignore_eos=True)]

    async def run(prefill, d1, d2, mixed) -> None:  # noqa: ANN001
        tok = mixed.engine.tokenizer
        members = [(prefill, "prefill"), (d1, "decode"), (d2, "decode")]
        for k, params in enumerate(cases):  # new prompts each case: nothing cached yet
            prompts = [tok.encode(f"Case {k}, letter {i}: " + DOC[: 200 + 30 * i])
                       for i in range(4)]
            want = await _tokens(mixed, prompts, params)
            before = 0
            for e in (d1, d2):
                before += await asyncio.wrap_future(e.call_on_engine_thread(
                    lambda eng: eng.kv_store.peer_fetches))
            async with cluster(members) as (reg, master):
                tasks = _staggered(master, prompts, params)
                busy = None
                for _ in range(400):  # until a decode instance is decoding two or more
                    await asyncio.sleep(0.02)
                    busy = next((v for v in reg.routable() if v.info.role == "decode"
                                 and v.load.num_running >= 2), None)
                    if busy is not None:
                        break
                assert busy is not None, "no decode instance got going"
                resp = await master.switch_role(busy.instance_id, "prefill",
                                                drain_timeout_s=30)
                assert resp.role == "prefill" and resp.migrated >= 1
                got = await asyncio.gather(*tasks)
                assert got == want  # each exactly once, each right
                assert master.num_migrated == resp.migrated
                # every hand-on fetched its KV: the prefill handoffs and the migrated ones
                fetches = 0
                for e in (d1, d2):
                    fetches += await asyncio.wrap_future(e.call_on_engine_thread(
                        lambda eng: eng.kv_store.peer_fetches))
                assert fetches - before == master.num_pd_handoffs + master.num_migrated
                await master.switch_role(busy.instance_id, "decode")

    with engines(cfg, 4) as (prefill, d1, d2, mixed):
        asyncio.run(run(prefill, d1, d2, mixed))
