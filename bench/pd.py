"""Prefill/decode disaggregation on this machine, equal cores: one prefill and one decode
instance against two mixed instances, each instance on its own core.

    python -m bench.pd [--rate 1.5] [--num-prompts 60] [--input-len 1000] [--output-len 128]
                       [--slo-ttft-ms 4000] [--slo-tpot-ms 60] [--json PATH]

For each layout it starts an ``xllm-master`` (no spawned instances) and two ``xllm-server``
instances registered with it, pinned with ``taskset`` to cores 0 and 1 (one thread each),
then runs ``bench.serve`` against the master: Poisson arrivals at ``--rate``, prompts of
about ``--input-len`` tokens and outputs of about ``--output-len`` (lengths nearly fixed),
goodput under the SLO. For the PD layout it also reports the KV transfer's time against the
prefill it follows: the decode instance's mean fetch time (its ``/metrics``) over the time
the prefill instance takes for one prompt at its reported prompt speed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
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


def run_layout(roles: tuple[str, str], args: argparse.Namespace, out: Path) -> dict:
    http, grpc_port = _port(), _port()
    master = subprocess.Popen(
        [sys.executable, "-m", "xllm.service.master_server", "--port", str(http),
         "--grpc-port", str(grpc_port), "--heartbeat-timeout", "5", *ENGINE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    instances, urls = [], []
    try:
        for core, role in enumerate(roles):
            port = _port()
            urls.append(f"http://127.0.0.1:{port}")
            instances.append(subprocess.Popen(
                ["taskset", "-c", str(core), sys.executable, "-m", "xllm.api.server",
                 "--port", str(port), "--master", f"127.0.0.1:{grpc_port}", "--role", role,
                 "--num-threads", "1", "--kv-cache-memory-gb", "2", *ENGINE],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 300
        while True:
            try:
                if len(requests.get(f"{url}/cluster/instances", timeout=2).json()) == 2:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        label = "+".join(roles)
        result = out / f"{label}.json"
        subprocess.run(
            [sys.executable, "-m", "bench.serve", "--base-url", url, "--label", label,
             "--request-rate", str(args.rate), "--num-prompts", str(args.num_prompts),
             "--input-len", str(args.input_len), "--max-input-len", str(args.input_len + 64),
             "--output-len", str(args.output_len),
             "--max-output-len", str(args.output_len + 16), "--length-sigma", "0.05",
             "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
             "--warmup", "2", "--json", str(result)], check=True)
        row = json.loads(result.read_text())["runs"][0]
        for key in [k for k in row if k.endswith("_samples")] + ["requests"]:
            row.pop(key, None)
        views = requests.get(f"{url}/cluster/instances", timeout=10).json()
        report = {"layout": label, "serve": row}
        if roles == ("prefill", "decode"):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--slo-ttft-ms", type=float, default=4000)
    parser.add_argument("--slo-tpot-ms", type=float, default=60)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores")
    report = {"cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for roles in (("mixed", "mixed"), ("prefill", "decode")):
            r = run_layout(roles, args, Path(tmp))
            report["+".join(roles)] = r
            print(r["layout"], _summary(r), {k: v for k, v in r.items()
                                             if k not in ("serve", "layout")}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
