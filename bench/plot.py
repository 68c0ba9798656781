"""Pictures and tables for benchmark reports.

    timeline_png("bench/out/reload.png", {"gunicorn HUP": r1, "fugue HUP": r2}, "HUP storm")
    print(markdown_table(rows, ["scenario", "requests", "failed"]))

Called by the benchmark drivers (gunicorn_side.py and the fugue half) with
loadgen.Result objects. matplotlib runs headless (Agg); nothing here needs a
display.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

try:  # run as a script (python3 bench/x.py) or imported as bench.plot
    from loadgen import BUCKET_S, FAILURE_KINDS
except ImportError:
    from bench.loadgen import BUCKET_S, FAILURE_KINDS

_KIND_COLOURS = dict(zip(FAILURE_KINDS, (
    "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")))


def timeline_png(path: str, series: Mapping[str, object], title: str) -> str:
    """Draw one row per series: ok requests/s (blue line, left axis) and
    failures/s stacked by kind (bars, right axis), with every load.mark()
    as a labelled vertical line. All rows share the time axis, so the same
    scenario on two servers lines up. Returns `path`.
    """
    names = list(series)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.6 * len(names) + 0.6),
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        result = series[name]
        t = [b.t for b in result.timeline]
        # The last bucket is cut short by stop(): divide by its real width.
        widths = [max(min(BUCKET_S, result.duration - b.t), 1e-3) for b in result.timeline]
        ax.plot(t, [b.ok / w for b, w in zip(result.timeline, widths)], color="#1f77b4",
                linewidth=1.2, label="ok/s")
        ax.set_ylabel("ok requests/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name}: {result.ok} ok, {result.failed} failed"
                     f" ({result.failures_text()})", fontsize=9, loc="left")
        fails = ax.twinx()
        bottom = [0.0] * len(t)
        for kind in FAILURE_KINDS:
            rates = [b.failures[kind] / w for b, w in zip(result.timeline, widths)]
            if any(rates):
                fails.bar(t, rates, width=BUCKET_S, bottom=bottom, align="edge",
                          color=_KIND_COLOURS[kind], alpha=0.7, label=kind)
                bottom = [a + b for a, b in zip(bottom, rates)]
        fails.set_ylabel("failures/s", color="#d62728")
        fails.set_ylim(bottom=0, top=max(max(bottom, default=0) * 1.15, 10))
        if any(bottom):
            fails.legend(loc="upper right", fontsize=7)
        for mark_t, label in result.marks:
            ax.axvline(mark_t, color="#2ca02c", linestyle="--", linewidth=0.8)
            ax.annotate(label, (mark_t, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=7, va="top", ha="right", color="#2ca02c")
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence, columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table.

    `rows` are mappings (looked up by column name) or sequences (in column
    order). None prints as "-", floats with 3 decimals, anything else by str().
    """
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        values = ([row.get(c) for c in columns] if isinstance(row, Mapping)
                  else list(row))
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)
