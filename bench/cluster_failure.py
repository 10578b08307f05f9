"""bench.cluster's failure test: SIGKILL of one instance of a live cluster under streams.

The streams start one at a time (each once the master has taken the previous one), so the
master's request numbers (``mreq-<n>``, in its "resuming" log lines) name them. Once every
stream has streamed, the instance running the most requests is SIGKILLed; a stream that
ends before that makes the trial void, and it repeats with longer outputs (see
:func:`kill_phase`). Reported:

- ``detection_s``: kill -> the registry declares the instance dead, from the master's
  ``xllm_master_last_instance_down_timestamp_seconds`` (or, when other instances went down
  too, the victim's own "down" log line), and that minus the heartbeat timeout;
- ``kill_to_first_resumed_token_s``: kill -> the first event at the client of each stream
  the master resumed because of the victim (a SIGKILL resets the victim's streams at once,
  so resumption starts before the deadline);
- whether every stream still completed with all its tokens.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from xllm.benchmarks import prometheus as prom
from xllm.benchmarks.cluster import InstanceProcess, LocalCluster
from xllm.benchmarks.serve import Client, RequestSpec

__all__ = ["kill_phase"]

_RESUMING = re.compile(r"resuming mreq-(\d+)-\S+ after (\d+) tokens \(attempt \d+\): (.*)")
_DOWN = re.compile(r"instance (\S+) down: (.*)")
_MISSED_BY = re.compile(r"missed its heartbeat deadline by ([\d.]+) s")


async def _victim(cluster: LocalCluster) -> tuple[InstanceProcess, float]:
    """The instance running the most requests now, and that number."""
    instances = cluster.instances()
    if not instances:
        raise RuntimeError("no instance process of the cluster is running")
    # All at once: the streams run on while this scrapes, and a short one may end first.
    scraped = await asyncio.gather(*(prom.scrape(inst.url) for inst in instances))
    running = [prom.value(m, "xllm_num_requests_running") for m in scraped]
    best = max(range(len(instances)), key=running.__getitem__)
    return instances[best], running[best]


class _VoidTrial(Exception):
    """A stream ended before every stream had streamed: nothing was killed."""


async def _start_streams(
    client: Client, specs: list[RequestSpec], deadline: float
) -> tuple[list[asyncio.Task[Any]], list[list[float]]]:
    """Starts ``specs`` one at a time (each once the master has taken the previous one: the
    master numbers requests as it takes them, mreq-<n>, and its "resuming" log lines name
    them so), then waits until every stream has 2 events. _VoidTrial when one ended first;
    on any exception the streams are cancelled."""
    times: list[list[float]] = [[] for _ in specs]
    tasks: list[asyncio.Task[Any]] = []
    try:
        for j, spec in enumerate(specs):
            accepted = asyncio.Event()
            tasks.append(
                asyncio.create_task(
                    client.run(
                        spec, on_accept=lambda _t, e=accepted: e.set(), on_event=times[j].append
                    )
                )
            )
            while not accepted.is_set() and not tasks[-1].done():
                if time.monotonic() > deadline:
                    raise RuntimeError("the master did not take the kill-phase streams in time")
                await asyncio.sleep(0.005)
        while min(len(t) for t in times) < 2:
            ended = [(j, t.result()) for j, t in enumerate(tasks) if t.done()]
            if ended:
                why = "; ".join(
                    f"stream {j}: {r.output_tokens} tokens, error {r.error}" for j, r in ended
                )
                if any(r.error for _, r in ended):  # a refusal or a failure: not timing
                    raise RuntimeError(f"a kill-phase stream failed before the kill: {why}")
                raise _VoidTrial(f"{why}; events so far {[len(t) for t in times]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the kill-phase streams did not all stream in time; events so far "
                    f"{[len(t) for t in times]}"
                )
            await asyncio.sleep(0.01)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return tasks, times


async def _wait_idle(cluster: LocalCluster, deadline: float) -> None:
    """Until no instance holds a request (a void trial's cancelled streams are aborted)."""
    while True:
        busy = 0.0
        for inst in cluster.instances():
            m = await prom.scrape(inst.url)
            busy += prom.value(m, "xllm_num_requests_running")
            busy += prom.value(m, "xllm_num_requests_waiting")
        if busy == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the instances still hold the void trial's streams")
        await asyncio.sleep(0.05)


async def kill_phase(
    cluster: LocalCluster,
    client: Client,
    specs: list[RequestSpec],
    sent_before: int,
    heartbeat_timeout_s: float,
    timeout_s: float,
    *,
    max_output_len: int | None = None,
    max_trials: int = 3,
) -> dict[str, Any]:
    """Streams ``specs`` (all ``ignore_eos``), SIGKILLs the busiest instance once every stream
    has 2 events, and reports what the master and the client saw (module docstring).
    ``sent_before``: completions this master was sent before (its request numbering).

    Every stream must be under way at the kill. When one ends before the last has streamed
    (a policy may queue several streams on one instance: on a starved machine that
    instance's prefill step can outlast a whole stream elsewhere), the trial is void:
    its streams are cancelled and the trial repeats, up to ``max_trials`` in all, with
    outputs twice as long each time (up to ``max_output_len``, default: as given) -- the
    prompts are cached by then, too. The report lists the void trials."""
    if max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    deadline = time.monotonic() + timeout_s
    cap = max(max_output_len or 0, max(s.output_len for s in specs))
    void: list[dict[str, Any]] = []
    for trial in range(max_trials):
        try:
            tasks, times = await _start_streams(client, specs, deadline)
            break
        except _VoidTrial as e:
            void.append({"output_len": max(s.output_len for s in specs), "why": str(e)})
            if trial + 1 == max_trials:
                raise RuntimeError(
                    f"in each of {max_trials} trials a kill-phase stream ended before every "
                    f"stream had 2 events (raise --kill-output-len?): {void}"
                ) from None
            sent_before += len(specs)  # the master numbered the void trial's streams
            specs = [replace(s, output_len=min(2 * s.output_len, cap)) for s in specs]
            await _wait_idle(cluster, deadline)
    try:
        m0, (victim, running) = await asyncio.gather(prom.scrape(cluster.url), _victim(cluster))
        if victim.instance_id is None:
            raise RuntimeError(
                f"cannot tell the registry id of instance {victim.url} (it listens "
                f"on {sorted(victim.ports)}); was it given --instance-id?"
            )
        log_offset = len(cluster.log_text())  # what the master logs from here on is about the kill
        kill_wall, kill_at = time.time(), time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
    finally:  # on any failure, no stream outlives the phase
        for t in tasks:
            t.cancel()
    # The stream break resumes flights at once; the registry declares the death only at
    # the heartbeat deadline, which may come after the streams ended: wait for it.
    while True:
        m1 = await prom.scrape(cluster.url)
        log = cluster.log_text()[log_offset:]
        down = [m for m in _DOWN.finditer(log) if m.group(1) == victim.instance_id]
        if down:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the master never declared the killed instance {victim.instance_id} dead"
            )
        await asyncio.sleep(0.05)
    dm = prom.delta(m1, m0)
    if prom.value(dm, "xllm_master_instances_down_total") == 1:  # only the victim: exact
        detected_at = prom.value(m1, "xllm_master_last_instance_down_timestamp_seconds")
        source = "xllm_master_last_instance_down_timestamp_seconds"
    else:  # others were declared dead too: the victim's own log line (ms resolution)
        stamp = log[: down[0].start()].rsplit("\n", 1)[-1].split(" ")[:2]
        detected_at = datetime.strptime(" ".join(stamp), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        source = "the master's log line"
    detection = detected_at - kill_wall
    resumed_ids = [
        int(m.group(1))
        for m in _RESUMING.finditer(log)
        if re.match(rf"instance {re.escape(str(victim.instance_id))}[ :]", m.group(3))
    ]
    affected = sorted({k - sent_before - 1 for k in resumed_ids})
    unmatched = [j for j in affected if not 0 <= j < len(specs)]
    missed = _MISSED_BY.search(down[0].group(2))
    first_after = {
        j: next((t - kill_at for t in times[j] if t > kill_at), None)
        for j in affected
        if j not in unmatched
    }
    resume = [v for v in first_after.values() if v is not None]
    unaffected_gaps = [
        next((t - kill_at for t in times[j] if t > kill_at), 0.0)
        for j in range(len(specs))
        if j not in first_after
    ]
    completed = [
        r.ok and r.output_tokens == s.output_len for r, s in zip(results, specs, strict=True)
    ]
    return {
        "streams": len(specs),
        "output_len": max(s.output_len for s in specs),
        "void_trials": void,
        "victim": {
            "url": victim.url,
            "instance_id": victim.instance_id,
            "running_at_kill": running,
        },
        "events_before_kill": [sum(1 for t in ts if t <= kill_at) for ts in times],
        "heartbeat_timeout_s": heartbeat_timeout_s,
        "detection_s": detection,
        "detection_source": source,
        "detection_after_deadline_s": detection - heartbeat_timeout_s,
        "down_reason": down[0].group(2),
        "registry_late_s": float(missed.group(1)) if missed else None,
        "instances_down": prom.value(dm, "xllm_master_instances_down_total"),
        "resumed_flights": prom.value(dm, "xllm_master_resumed_flights_total"),
        "affected_streams": sorted(first_after),
        "unmatched_resumes": unmatched,
        "kill_to_first_resumed_token_s": {
            "per_stream": first_after,
            "max": max(resume) if resume else None,
            "median": statistics.median(resume) if resume else None,
        },
        "unaffected_first_token_after_kill_s": max(unaffected_gaps, default=None),
        "master_resume_s_mean": (
            prom.value(dm, "xllm_master_resume_seconds_sum")
            / max(1.0, prom.value(dm, "xllm_master_resume_seconds_count"))
        ),
        "all_completed": all(completed),
        "completed": sum(completed),
        "errors": sorted({r.error for r in results if r.error}),
    }
