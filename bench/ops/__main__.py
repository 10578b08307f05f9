"""Op microbenchmarks: each native op against its reference, as ratios measured in one run.

    python -m bench.ops [--only attention,block_pool,...] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

from bench.ops.common import Row

SUITES = (
    "attention", "attention_isa", "kv_write", "linear", "linear_8b", "linear_rows", "int16_rows",
    "linear_stack", "block_pool", "queue", "vmm", "allreduce", "moe", "mla", "triton_gpu",
)


def _fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def print_table(rows: list[Row]) -> None:
    header = ("op", "shape", "native", "reference", "ratio", "target", "baseline / note")
    lines = [header]
    for r in rows:
        status = "" if r.met is None else (" met" if r.met else " MISSED")
        note = r.reference + (f"; {r.note}" if r.note else "")
        lines.append((r.op, r.shape, _fmt_seconds(r.native_s), _fmt_seconds(r.reference_s),
                      f"{r.ratio:.2f}x", (r.target + status).strip(), note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)] + [line[-1]]
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SUITES),
                        help=f"comma-separated suites to run, from: {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")

    print(f"# machine: {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"python {platform.python_version()}", flush=True)
    rows: list[Row] = []
    for suite in suites:
        module = importlib.import_module(f"bench.ops.{suite}")
        suite_rows = module.run(quick=args.quick)
        print_table(suite_rows)
        print(flush=True)
        rows.extend(suite_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in rows], f, indent=2)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
