"""Renders rows written by ``python -m bench.ops --json PATH`` as a Markdown table.

    python -m bench.ops.report PATH
"""

from __future__ import annotations

import json
import sys

from bench.ops.__main__ import _fmt_seconds


def render(rows: list[dict]) -> str:
    lines = ["| op | shape | native | reference | ratio | target | baseline / note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        status = "" if r["met"] is None else (" met" if r["met"] else " **missed**")
        note = r["reference"] + (f"; {r['note']}" if r["note"] else "")
        lines.append(f"| {r['op']} | {r['shape']} | {_fmt_seconds(r['native_s'])} | "
                     f"{_fmt_seconds(r['reference_s'])} | {r['ratio']:.2f}x | "
                     f"{(r['target'] + status).strip()} | {note.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.ops.report PATH")
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
