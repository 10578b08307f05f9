"""Serving benchmark against any OpenAI-compatible server (``python -m bench.serve``, also
``xllm bench serve``).

    python -m bench.serve --base-url http://127.0.0.1:8000 --request-rate 1,2,4 \\
        --num-prompts 200 --slo-ttft-ms 1000 --slo-tpot-ms 200 --json out.json --plot-dir out/
    python -m bench.serve --launch --server-args "--max-num-seqs 64" --concurrency 8

Load: open loop at a request rate (Poisson arrivals, seeded; ``inf`` sends everything at
once) or closed loop at a fixed concurrency. Requests are streamed completions
(``/v1/completions`` or ``/v1/chat/completions``) whose prompt and output lengths are drawn
from a seeded ShareGPT-like distribution (log-normal, clipped); outputs run to their drawn
length (``ignore_eos``, plus ``min_tokens`` = that length for servers such as
llama-cpp-python's that only know the latter; ``--no-ignore-eos`` for servers with neither).

Reports request throughput, output tokens/s, TTFT, TPOT (per request: time after the first
token / further tokens), ITL (gaps between streamed events) and end-to-end latency at
p50/p90/p99, and goodput: completed requests per second meeting every SLO given. Writes JSON
and PNG plots (latency CDFs; throughput and p99 latencies against request rate when several
rates run). ``--compare A.json B.json`` only reads earlier runs: with ``--plot-dir`` it draws
their plots side by side, and with ``--slo-ttft-ms`` / ``--slo-tpot-ms`` it prints their
goodput recomputed under those SLOs from the requests each run kept (a larger model's runs
judged by a looser SLO than the one they ran under, say).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm.benchmarks.http_client import HTTPError, get_json, post_sse
from xllm.benchmarks.plots import plot_runs

__all__ = ["Client", "RequestResult", "RequestSpec", "main", "run_load", "shared_prefix_requests",
           "summarize", "synthetic_requests"]

# Short common English words: about one token each with a leading space in BPE vocabularies,
# so a prompt of k words is about k tokens on any server's tokenizer.
_WORDS = ("time year people way day man thing woman life child world school state family "
          "student group country problem hand part place case week company system program "
          "question work government number night point home water room mother area money "
          "story fact month lot right study book eye job word business issue side kind head "
          "house service friend father power hour game line end member law car city name "
          "team minute idea kid body back parent face others level office door health person "
          "art war history party result change morning reason research girl guy moment air "
          "teacher force education").split()
PERCENTILES = (50, 90, 99)


@dataclass
class RequestSpec:
    prompt: str
    prompt_words: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def synthetic_requests(n: int, seed: int, input_mean: int, output_mean: int, max_input: int,
                       max_output: int, sigma: float, tag: str = "") -> list[RequestSpec]:
    """ShareGPT-like lengths: log-normal with the given means, clipped; seeded. ``tag`` goes
    into every prompt's head: the same lengths and words under another tag share no prefix
    block, so each load level of a sweep prefills as much as the first one did."""
    rng = random.Random(seed)

    def draw(mean: int, lo: int, hi: int) -> int:
        mu = math.log(mean) - sigma * sigma / 2  # so that E[x] = mean
        return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))

    specs = []
    for i in range(n):
        words = draw(input_mean, 4, max_input)
        # A distinct head per request, so prefix caching cannot serve whole prompts.
        text = f"{tag}{i}: " + " ".join(rng.choice(_WORDS) for _ in range(words))
        specs.append(RequestSpec(text, words, draw(output_mean, 1, max_output)))
    return specs


def shared_prefix_requests(num_groups: int, per_group: int, prefix_words: int,
                           question_words: int, output_len: int, seed: int) -> list[RequestSpec]:
    """``num_groups`` x ``per_group`` requests in a seeded shuffled order (groups
    interleave): each group's prompts share one long document of ``prefix_words`` words
    (a system prompt, a file being asked about) followed by a distinct question of
    ``question_words`` words -- the traffic prefix caching and prefix-aware routing are for.
    Words are about one token each, and the prefix ends at a word boundary, so every prompt
    of a group tokenizes to the same leading tokens."""
    for name, v in (("num_groups", num_groups), ("per_group", per_group),
                    ("prefix_words", prefix_words), ("question_words", question_words),
                    ("output_len", output_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    rng = random.Random(seed)
    docs = [f"Document {g}: " + " ".join(rng.choice(_WORDS) for _ in range(prefix_words))
            for g in range(num_groups)]
    order = [g for g in range(num_groups) for _ in range(per_group)]
    rng.shuffle(order)
    specs = []
    for i, g in enumerate(order):
        question = f"\nQuestion {i}: " + " ".join(rng.choice(_WORDS) for _ in range(question_words))
        specs.append(RequestSpec(docs[g] + question, prefix_words + question_words, output_len))
    return specs


def _percentiles(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": (sum(values) / len(values)) if values else None}
    ordered = sorted(values)
    for p in PERCENTILES:
        if not ordered:
            out[f"p{p}"] = None
            continue
        k = (len(ordered) - 1) * p / 100  # linear interpolation, as numpy's default
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{p}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
    return out


class Client:
    def __init__(self, base_url: str, model: str, endpoint: str, api_key: str | None,
                 ignore_eos: bool) -> None:
        self.url = base_url.rstrip("/") + ("/v1/chat/completions" if endpoint == "chat"
                                           else "/v1/completions")
        self.model, self.endpoint, self.ignore_eos = model, endpoint, ignore_eos
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def run(self, spec: RequestSpec, *,
                  on_accept: Callable[[float], None] | None = None,
                  on_event: Callable[[float], None] | None = None) -> RequestResult:
        """Streams one request. ``on_accept(t)``: the server took it (HTTP 200);
        ``on_event(t)``: an event carrying text arrived (perf_counter times)."""
        payload: dict[str, Any] = {"model": self.model, "max_tokens": spec.output_len,
                                   "temperature": 0.0, "stream": True,
                                   "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            payload["prompt"] = spec.prompt
        if self.ignore_eos:
            # Both extensions: vLLM and xllm know ignore_eos; llama-cpp-python's server only
            # min_tokens, which holds EOS back just as well when it equals max_tokens.
            payload["ignore_eos"] = True
            payload["min_tokens"] = spec.output_len
        result = RequestResult(ok=False, prompt_tokens=spec.prompt_words)
        start = result.start = time.perf_counter()
        last = None
        events = 0
        try:
            async for at, data in post_sse(self.url, payload, self.headers, on_accept):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise HTTPError(200, data)
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", spec.prompt_words)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if not any(_text(c) for c in chunk.get("choices") or []):
                    continue
                events += 1
                if on_event is not None:
                    on_event(at)
                if last is None:
                    result.ttft = at - start
                else:
                    result.itl.append(at - last)
                last = at
            result.e2e = time.perf_counter() - start
            result.output_tokens = result.output_tokens or events  # servers without usage
            result.ok = result.ttft is not None
            if not result.ok:
                result.error = "no tokens streamed"
        except (HTTPError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            result.error = f"{type(e).__name__}: {e}"
        return result


def _text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(client: Client, specs: list[RequestSpec], rate: float | None,
                   concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Open loop at ``rate`` (Poisson) or closed loop at ``concurrency``; (results, seconds)."""
    start = time.perf_counter()
    if concurrency is not None:
        queue = list(reversed(specs))
        results: list[RequestResult] = []

        async def worker() -> None:
            while queue:
                results.append(await client.run(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start
    rng = random.Random(seed + 1)
    tasks = []
    next_at = start
    for spec in specs:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.run(spec)))
        if rate is not None and math.isfinite(rate):
            next_at += rng.expovariate(rate)
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def within_slo(ttft: float, tpot: float | None, slo_ttft: float | None,
               slo_tpot: float | None) -> bool:
    """Whether a request meets the SLOs given (None: no bound; a one-token output has no
    TPOT and meets any TPOT bound). Any unit, the same for both."""
    return ((slo_ttft is None or ttft <= slo_ttft)
            and (slo_tpot is None or tpot is None or tpot <= slo_tpot))


def summarize(results: list[RequestResult], duration: float, slo_ttft: float | None,
              slo_tpot: float | None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok
            if within_slo(r.ttft, r.tpot, slo_ttft, slo_tpot)]  # type: ignore[arg-type]
    ms = 1000.0
    out = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r.output_tokens for r in ok) / duration,
        "input_throughput": sum(r.prompt_tokens for r in ok) / duration,
        "goodput": len(good) / duration,
        "goodput_share": len(good) / len(results) if results else 0.0,
    }
    for name, values in (("ttft_ms", [r.ttft * ms for r in ok]),  # type: ignore[operator]
                         ("tpot_ms", [r.tpot * ms for r in ok if r.tpot is not None]),
                         ("itl_ms", [g * ms for r in ok for g in r.itl]),
                         ("e2e_ms", [r.e2e * ms for r in ok])):  # type: ignore[operator]
        out[name] = _percentiles(values)
        out[name + "_samples"] = values
    # Per request (in completion order), so goodput under other SLOs can be recomputed later,
    # and the run replayed as a trace (bench.simulate): when each was sent, its lengths.
    t0 = min((r.start for r in results), default=0.0)
    out["requests"] = [{"ttft_ms": r.ttft * ms, "tpot_ms": None if r.tpot is None  # type: ignore[operator]
                        else r.tpot * ms, "output_tokens": r.output_tokens,
                        "prompt_tokens": r.prompt_tokens, "start_s": r.start - t0}
                       for r in ok]
    errors = sorted({r.error for r in results if r.error})
    out["errors"] = errors[:10]
    return out


def regoodput(run: dict[str, Any], slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> tuple[float, float]:
    """(goodput in requests/s, share of requests) of a summarized run (``summarize``'s
    dict, from --json) under other SLOs, from the requests it kept."""
    good = [r for r in run["requests"]
            if within_slo(r["ttft_ms"], r["tpot_ms"], slo_ttft_ms, slo_tpot_ms)]
    total = run["completed"] + run["failed"]
    return len(good) / run["duration_s"], len(good) / total if total else 0.0


def _print_run(label: str, load: str, s: dict[str, Any]) -> None:
    def row(name: str, key: str) -> str:
        v = s[key]
        cells = " ".join(f"{v[k]:9.1f}" if v[k] is not None else "        -"
                         for k in ("mean", "p50", "p90", "p99"))
        return f"  {name:<14}{cells}"

    print(f"== {label} @ {load}: {s['completed']} ok, {s['failed']} failed, "
          f"{s['duration_s']:.1f} s")
    print(f"  requests/s {s['request_throughput']:.3f}   output tok/s "
          f"{s['output_throughput']:.1f}   input tok/s {s['input_throughput']:.1f}   "
          f"goodput {s['goodput']:.3f} req/s ({100 * s['goodput_share']:.0f}% within SLO)")
    print(f"  {'(ms)':<14}{'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                      ("E2E", "e2e_ms")):
        print(row(name, key))
    for e in s["errors"]:
        print(f"  error: {e}")


def _launch(server_args: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Starts xllm-server on a free loopback port; (process, base URL) once it is ready."""
    import re

    cmd = [sys.executable, "-m", "xllm.api.server", "--port", "0", *shlex.split(server_args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            break
        sys.stderr.write(line)
        m = re.search(r" on (http://\S+)", line)
        if m and "serving" in line:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("xllm-server did not become ready: " + " ".join(cmd))


def _parse_list(text: str | None) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--launch", action="store_true",
                   help="start xllm-server (python -m xllm.api.server) and stop it afterwards")
    p.add_argument("--server-args", default="", help="extra xllm-server arguments for --launch")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key")
    p.add_argument("--label", help="name of this server in the JSON and plots")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", help="requests/s, comma-separated to sweep; inf = all "
                      "at once (default: inf)")
    load.add_argument("--concurrency", help="fixed number of requests in flight, "
                      "comma-separated to sweep")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length (words)")
    p.add_argument("--output-len", type=int, default=64, help="mean output length (tokens)")
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--length-sigma", type=float, default=0.8,
                   help="log-normal sigma of both lengths (ShareGPT's spread is about 0.8-1)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--plot-dir", metavar="DIR", help="write PNG plots here")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="only read earlier --json results: plot them together (--plot-dir), "
                        "print their goodput under --slo-ttft-ms / --slo-tpot-ms")
    return p


async def _bench(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or (await get_json(base_url.rstrip("/") + "/v1/models",
                                          headers))["data"][0]["id"]
    client = Client(base_url, model, args.endpoint, args.api_key, args.ignore_eos)
    warm = synthetic_requests(args.warmup, args.seed + 999, 16, 4, 32, 8, 0.1)
    for spec in warm:
        await client.run(spec)
    runs = []
    if args.concurrency:
        loads = [("concurrency", int(c)) for c in _parse_list(args.concurrency)]
    else:
        loads = [("request_rate", r) for r in (_parse_list(args.request_rate) or [math.inf])]
    for index, (kind, value) in enumerate(loads):
        # Same lengths at every load level, but new prompts: a level must not find the
        # previous level's prompts in the server's prefix cache.
        specs = synthetic_requests(args.num_prompts, args.seed, args.input_len,
                                   args.output_len, args.max_input_len, args.max_output_len,
                                   args.length_sigma, tag=f"L{index}-")
        rate = value if kind == "request_rate" else None
        conc = int(value) if kind == "concurrency" else None
        results, duration = await run_load(client, specs, rate, conc, args.seed)
        ms = 1e-3
        s = summarize(results, duration, args.slo_ttft_ms and args.slo_ttft_ms * ms,
                      args.slo_tpot_ms and args.slo_tpot_ms * ms)
        s[kind] = value if math.isfinite(value) else "inf"
        _print_run(args.label or model, f"{kind}={s[kind]}", s)
        runs.append(s)
    return {"label": args.label or model, "base_url": base_url, "model": model,
            "endpoint": args.endpoint, "config": {k: v for k, v in vars(args).items()
                                                  if k not in ("api_key", "compare")},
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        slo = args.slo_ttft_ms is not None or args.slo_tpot_ms is not None
        if not args.plot_dir and not slo:
            print("bench.serve: --compare needs --plot-dir or an SLO (--slo-ttft-ms, "
                  "--slo-tpot-ms)", file=sys.stderr)
            return 2
        reports = [json.loads(Path(p).read_text()) for p in args.compare]
        if slo:
            print(f"goodput under TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms")
            for report in reports:
                for run in report["runs"]:
                    load = next(f"{k}={run[k]}" for k in ("request_rate", "concurrency")
                                if k in run)
                    goodput, share = regoodput(run, args.slo_ttft_ms, args.slo_tpot_ms)
                    print(f"  {report['label']} @ {load}: {goodput:.3f} req/s "
                          f"({100 * share:.0f}% within SLO)")
        if args.plot_dir:
            for path in plot_runs(reports, Path(args.plot_dir)):
                print(f"wrote {path}")
        return 0
    proc = None
    base_url = args.base_url
    if args.launch:
        proc, base_url = _launch(args.server_args)
    try:
        report = asyncio.run(_bench(args, base_url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot_dir:
        for path in plot_runs([report], Path(args.plot_dir)):
            print(f"wrote {path}")
    return 0 if all(r["completed"] for r in report["runs"]) else 1

