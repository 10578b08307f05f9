"""PNG plots of serving-benchmark reports (matplotlib, the ``bench`` extra).

``plot_runs(reports, out_dir)``: one report per server (its ``label``), each with one run
per load level. Draws latency CDFs (TTFT, TPOT, ITL, E2E; one line per server and load) and,
when some server ran at two or more request rates, throughput and p99 latencies against the
request rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_runs"]

_LATENCIES = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
              ("e2e_ms", "end-to-end latency (ms)"))


def _load_name(run: dict[str, Any]) -> str:
    if "concurrency" in run:
        return f"concurrency {run['concurrency']}"
    return f"{run.get('request_rate', 'inf')} req/s"


def plot_runs(reports: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.serve: matplotlib is not installed (pip install 'xllm[bench]'); "
              "no plots written")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, _LATENCIES, strict=True):
        for report in reports:
            for run in report["runs"]:
                values = sorted(run.get(key + "_samples") or [])
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post",
                        label=f"{report['label']} @ {_load_name(run)}")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    swept = [r for r in reports
             if sum(1 for run in r["runs"] if isinstance(run.get("request_rate"), (int, float)))
             >= 2]
    if swept:
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
        for number, report in enumerate(swept):
            runs = sorted((run for run in report["runs"]
                           if isinstance(run.get("request_rate"), (int, float))),
                          key=lambda run: run["request_rate"])
            rates = [run["request_rate"] for run in runs]
            label = report["label"]
            color = f"C{number}"  # one colour per server on every panel
            axes[0].plot(rates, [run["output_throughput"] for run in runs], "o-", color=color,
                         label=label)
            axes[1].plot(rates, [run["request_throughput"] for run in runs], "o-", color=color,
                         label=f"{label} completed")
            axes[1].plot(rates, [run["goodput"] for run in runs], "s--", color=color,
                         label=f"{label} goodput (within SLO)")
            axes[2].plot(rates, [run["ttft_ms"]["p99"] for run in runs], "o-", color=color,
                         label=label)
            axes[3].plot(rates, [run["tpot_ms"]["p99"] for run in runs], "o-", color=color,
                         label=label)
        titles = ("output tokens/s", "requests/s", "p99 TTFT (ms)", "p99 TPOT (ms)")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[2:]:
            # A saturated server's latencies are orders of magnitude above the others':
            # a log axis keeps the others readable.
            values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
            if values and max(values) / min(values) > 20:
                ax.set_yscale("log")
        fig.tight_layout()
        path = out_dir / "vs_request_rate.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
