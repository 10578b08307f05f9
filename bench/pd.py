"""Prefill/decode disaggregation on this machine, equal cores: one prefill and one decode
instance against two mixed instances, each instance on its own core.

    python -m bench.pd [--rate 1.5 | --load F] [--num-prompts 60] [--input-len 1000]
                       [--output-len 128] [--slo-ttft-ms 4000] [--slo-tpot-ms 60] [--json PATH]
                       [--layouts mixed+mixed,prefill+decode,dynamic] [--profile-speed]

For each layout it starts an ``xllm-master`` (no spawned instances) and two ``xllm-server``
instances registered with it, pinned with ``taskset`` to cores 0 and 1 (one thread each),
then runs ``bench.serve`` against the master: Poisson arrivals at ``--rate`` (or, with
``--load F``, F over the seconds one prompt computes alone, timed first), prompts of
about ``--input-len`` tokens and outputs of about ``--output-len`` (lengths nearly fixed),
goodput under the SLO. For the PD layout it also reports the KV transfer's time against the
prefill it follows: the decode instance's mean fetch time (its ``/metrics``) over the time
the prefill instance takes for one prompt at its reported prompt speed, and over the
prompt's compute alone (one ``--input-len`` prompt through the same engine, pinned to one
core with one thread, nothing else running: median of five after a warm-up). The ``dynamic``
layout starts two mixed instances under ``--pd-policy dynamic`` (planning every 2 s, a
10 s dwell) and reports the planner's decisions and how long each role switch took; the
``switch`` layout switches two mixed instances to 1P:1D and back while the load runs and
times each switch from the decision to the instance's confirmation.

Each layout keeps bench.serve's per-request log and the speed models the instances reported,
so ``python -m bench.simulate --validate PD_JSON`` can replay the same run in simulation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.throughput import _cpu_name

ENGINE = ["--model", "demo", "--max-model-len", "2048"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


LAYOUTS = {"mixed+mixed": ("mixed", "mixed"), "prefill+decode": ("prefill", "decode"),
           "dynamic": ("mixed", "mixed"), "switch": ("mixed", "mixed")}


def time_prompt(input_len: int, repeats: int = 5) -> float:
    """Seconds one ``input_len``-token prompt takes to its first token on the demo engine
    as the instances run it (one thread; prefix caching off, a budget of the whole prompt):
    the median of ``repeats`` after a warm-up. Run pinned to one core."""
    import statistics

    from xllm import LLM, SamplingParams

    llm = LLM(model="demo", max_model_len=2048, num_threads=1, enable_prefix_caching=False,
              max_num_batched_tokens=max(input_len, 2048))
    params = SamplingParams(max_tokens=1, temperature=0.0)
    times = []
    for i in range(repeats + 1):
        ids = [(i * 7919 + j * 31) % 30000 + 100 for j in range(input_len)]
        t0 = time.perf_counter()
        llm.generate([ids], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _prompt_seconds(input_len: int) -> float:
    """time_prompt in a process of its own on core 0 (as the instances are pinned)."""
    code = f"from bench.pd import time_prompt; print(time_prompt({input_len}))"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _speed_models(views: list[dict]) -> list[dict | None]:
    """Each instance's reported speed model, with its role (None: none reported yet)."""
    return [{"role": v["role"], **v["load"]["speed"]} if v["load"]["speed"] else None
            for v in views]


def _switch_one(url: str, iid: str, role: str, answers: list[dict | None], i: int) -> None:
    answers[i] = requests.post(f"{url}/cluster/role", json={"instance_id": iid, "role": role},
                               timeout=120).json()


def _switches(url: str, at: list[float], log: list[dict]) -> None:
    """The switch layout: at each time in ``at`` (seconds into the load) the two instances
    switch together, to 1P:1D and then back to mixed; each switch timed from the request
    (the decision) to the instance's confirmation (its drain included)."""
    t0 = time.monotonic()
    ids = [v["instance_id"] for v in requests.get(f"{url}/cluster/instances", timeout=10).json()]
    for k, when in enumerate(at):
        time.sleep(max(0.0, t0 + when - time.monotonic()))
        roles = ("prefill", "decode") if k % 2 == 0 else ("mixed", "mixed")
        threads: list[threading.Thread] = []
        answers: list[dict | None] = [None, None]
        for i, role in enumerate(roles):
            threads.append(threading.Thread(target=_switch_one,
                                            args=(url, ids[i], role, answers, i)))
            threads[-1].start()
        for t in threads:
            t.join()
        log.append({"at_s": round(time.monotonic() - t0, 1), "to": list(roles),
                    "answers": answers})


def run_layout(name: str, args: argparse.Namespace, out: Path) -> dict:
    roles = LAYOUTS[name]
    http, grpc_port = _port(), _port()
    # The SLOs go to the master in every layout: the dynamic planner plans for them, and
    # with prefill and decode instances a prompt the prefill instance would start too late
    # goes whole to the decode instance (--pd-overflow, xllm.service.master.pd_overflow;
    # bench.pd --no-overflow: not).
    slo = ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    overflow = [] if args.no_overflow or name == "dynamic" else ["--pd-overflow"]
    pd = (["--pd-policy", "dynamic", "--pd-interval", "2",
           "--pd-min-dwell", "10", "--pd-window", "10"] if name == "dynamic" else [])
    pd += slo + overflow
    master = subprocess.Popen(
        [sys.executable, "-m", "xllm.service.master_server", "--port", str(http),
         "--grpc-port", str(grpc_port), "--heartbeat-timeout", "5", *pd, *ENGINE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = ["--profile-speed"] if args.profile_speed or name == "dynamic" else []
    url = f"http://127.0.0.1:{http}"
    instances, urls = [], []
    try:
        for core, role in enumerate(roles):
            port = _port()
            urls.append(f"http://127.0.0.1:{port}")
            instances.append(subprocess.Popen(
                ["taskset", "-c", str(core), sys.executable, "-m", "xllm.api.server",
                 "--port", str(port), "--master", f"127.0.0.1:{grpc_port}", "--role", role,
                 "--num-threads", "1", "--kv-cache-memory-gb", "2", *profile,
                 *shlex.split(args.instance_args),
                 *(shlex.split(args.prefill_args) if role == "prefill" else []), *ENGINE],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 300
        while True:  # both up, and (when they profile) their speed models reported
            try:
                views = requests.get(f"{url}/cluster/instances", timeout=2).json()
                if len(views) == 2 and (not profile or all(v["load"]["speed"] for v in views)):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        label = name
        result = out / f"{label}.json"
        speed = _speed_models(requests.get(f"{url}/cluster/instances", timeout=10).json())
        switch_log: list[dict] = []
        switcher = None
        if name == "switch":
            span = args.num_prompts / args.rate
            switcher = threading.Thread(target=_switches,
                                        args=(url, [span / 3, 2 * span / 3], switch_log))
            switcher.start()
        subprocess.run(
            [sys.executable, "-m", "bench.serve", "--base-url", url, "--label", label,
             "--request-rate", str(args.rate), "--num-prompts", str(args.num_prompts),
             "--input-len", str(args.input_len), "--max-input-len", str(args.input_len + 64),
             "--output-len", str(args.output_len),
             "--max-output-len", str(args.output_len + 16), "--length-sigma", "0.05",
             "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
             "--warmup", "2", "--json", str(result)], check=True)
        if switcher is not None:
            switcher.join()
        row = json.loads(result.read_text())["runs"][0]
        for key in [k for k in row if k.endswith("_samples")]:
            row.pop(key, None)
        views = requests.get(f"{url}/cluster/instances", timeout=10).json()
        # The speed models the instances reported before the load (profiled at start with
        # --profile-speed) and after it (refined by their steps): bench.simulate --validate
        # replays this run's request log against them.
        report = {"layout": label, "serve": row, "speed_models_before": speed,
                  "speed_models_after": _speed_models(views)}
        if name == "switch":
            report["switches"] = switch_log
        if name == "dynamic":
            report["pd"] = requests.get(f"{url}/cluster/pd", timeout=10).json()
            report["role_switches"] = _metric(url, "xllm_master_role_switches_total")
        if name == "prefill+decode":
            fetches = _metric(urls[1], "xllm_kv_peer_fetches_total")
            fetch_s = _metric(urls[1], "xllm_kv_peer_fetch_seconds_total")
            prefill = next(v for v in views if v["role"] == "prefill")
            tps = prefill["load"]["prefill_tokens_per_s"]
            report["fetches"] = fetches
            report["mean_fetch_ms"] = 1e3 * fetch_s / fetches if fetches else None
            report["prefill_tokens_per_s"] = tps
            if fetches and tps:
                report["transfer_share_of_prefill"] = (fetch_s / fetches) / (args.input_len / tps)
            report["pd_handoffs"] = _metric(url, "xllm_master_pd_handoffs_total")
            report["pd_overflows"] = _metric(url, "xllm_master_pd_overflows_total")
        return report
    finally:
        for p in [*instances, master]:
            p.terminate()
        for p in [*instances, master]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _summary(report: dict) -> str:
    s = report["serve"]
    pick = {k: s.get(k) for k in ("completed", "failed", "request_throughput", "goodput",
                                  "goodput_share", "ttft_ms", "tpot_ms")}
    return json.dumps(pick)


def _paired(rounds: list[dict]) -> dict:
    """Per round, prefill+decode's goodput and TPOT p99 over mixed+mixed's, and medians."""
    goodput, tpot = [], []
    for r in rounds:
        pd, mixed = r["prefill+decode"]["serve"], r["mixed+mixed"]["serve"]
        goodput.append(pd["goodput"] / mixed["goodput"] if mixed["goodput"] else float("inf"))
        tpot.append(pd["tpot_ms"]["p99"] / mixed["tpot_ms"]["p99"])
    return {"goodput_ratio": goodput, "tpot_p99_ratio": tpot,
            "median_goodput_ratio": statistics.median(goodput),
            "median_tpot_p99_ratio": statistics.median(tpot)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--load", type=float, default=None, metavar="F",
                        help="instead of --rate: F times the prompts per second one instance "
                             "computes, timed at the start (this machine's speed drifts "
                             "from hour to hour; a fixed rate can overload one run and idle "
                             "the next, and a simulator is best validated short of "
                             "saturation, where a small speed error is not a large wait)")
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--slo-ttft-ms", type=float, default=4000)
    parser.add_argument("--slo-tpot-ms", type=float, default=60)
    parser.add_argument("--no-overflow", action="store_true",
                        help="no --pd-overflow for the master of static layouts: the "
                             "prefill+decode layout never sends a prompt whole to its decode "
                             "instance")
    parser.add_argument("--layouts", default="mixed+mixed,prefill+decode",
                        help="comma-separated: mixed+mixed, prefill+decode, dynamic (two "
                             "mixed instances under --pd-policy dynamic), switch (two mixed "
                             "instances switched to 1P:1D a third into the load and back "
                             "at two thirds, by POST /cluster/role)")
    parser.add_argument("--profile-speed", action="store_true",
                        help="instances profile their speed at start (for bench.simulate "
                             "--validate); the dynamic layout always does")
    parser.add_argument("--instance-args", default="",
                        help="extra xllm-server flags for every instance of every layout")
    parser.add_argument("--prefill-args", default="",
                        help="extra xllm-server flags for prefill instances only (e.g. a "
                             "step budget of one prompt: --max-num-batched-tokens 1024)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the layouts N times in turns, the order reversed every "
                             "other round (this machine's speed drifts within minutes); "
                             "the record keeps every round and, with mixed+mixed and "
                             "prefill+decode, each round's ratios of the two and their "
                             "medians")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    layouts = args.layouts.split(",")
    for name in layouts:
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores")
    if args.load is not None and not 0 < args.load < 2:
        parser.error(f"--load must be in (0, 2), got {args.load}")
    report = {"cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    if args.load is not None:
        report["prompt_compute_s_at_start"] = start = _prompt_seconds(args.input_len)
        args.rate = round(args.load / start, 3)
        print(f"a {args.input_len}-token prompt computes in {start:.3f} s: rate {args.rate} "
              "req/s", flush=True)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            results: dict = {}
            for name in layouts if i % 2 == 0 else layouts[::-1]:
                r = run_layout(name, args, Path(tmp))
                results[name] = r
                # Timed after every layout: how far this machine's speed drifted during it.
                r["prompt_compute_s"] = _prompt_seconds(args.input_len)
                if name == "prefill+decode" and r.get("mean_fetch_ms"):
                    r["transfer_share_of_prompt_compute"] = (
                        r["mean_fetch_ms"] / 1e3 / r["prompt_compute_s"])
                print(name, _summary(r), {k: v for k, v in r.items()
                                          if k not in ("serve", "layout")}, flush=True)
            rounds.append(results)
    for name in layouts:
        report[name] = rounds[0][name]
    if args.repeat > 1:
        report["rounds"] = rounds
        if {"mixed+mixed", "prefill+decode"} <= set(layouts):
            report["paired"] = paired = _paired(rounds)
            print("prefill+decode against mixed+mixed, each round:", json.dumps(paired),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
