"""The bench's results for people (a table), for scripts (JSON) and as a bar chart (PNG)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import BenchError
from .verdict import Figure, Verdict, num

JSON_VERSION = 1
STAGE_COLOURS = {"storage": "#8c8c8c", "decode": "#4c72b0", "loader": "#55a868", "model": "#c44e52",
                 "end_to_end": "#8172b2"}


@dataclass
class BenchResult:
    """Everything a bench run found; ``to_json`` is its documented machine form."""

    data: dict[str, Any]  # path, kind, images, classes
    setup: dict[str, Any]  # device, machine, config, timing settings, load
    figures: list[Figure] = field(default_factory=list)
    verdict: Verdict | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "data": self.data,
            "setup": self.setup,
            "figures": [_figure_json(f) for f in self.figures],
            "verdict": None if self.verdict is None else {
                "limit": self.verdict.limit, "factor": self.verdict.factor, "text": self.verdict.text},
        }


def _figure_json(f: Figure) -> dict[str, Any]:
    r = f.rate
    return {
        "stage": f.stage, "key": f.key, "label": f.label, "workers": f.workers,
        "img_per_s": r.median, "img_per_s_min": r.low, "img_per_s_max": r.high,
        "img_per_s_windows": list(r.img_per_s), "mb_per_s": r.mb_median,
        "images": r.images, "seconds": r.seconds,
    }


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")


def header_lines(data: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """What is benched, where, with which settings (printed before the stages run)."""
    c = setup["config"]
    return [
        f"effitrain bench  {data['path']}  ({data['kind']}, {data['images']:,} images, {data['classes']} classes)",
        f"  device {setup['device']} ({setup['device_name']}), {setup['cpus']} CPU cores, load average "
        f"{setup['load_before']:.1f}; JPEG C extension {'on' if setup['jpeg_ext'] else 'off'}",
        f"  {c['path'] or 'default config'}: {c['arch']}, batch {c['batch_size']}, {c['image_size']} px, "
        f"amp {c['amp']}, channels_last {c['channels_last']}, compile {c['compile']}, decode {c['decode']}, "
        f"{c['workers']} training worker{'' if c['workers'] == 1 else 's'}",
        f"  each figure: median of {setup['windows']} windows over {setup['seconds']:g} s after a warm-up; "
        f"spread = slowest..fastest window",
    ]


def table_lines(result: BenchResult) -> list[str]:
    """The figures as a table, then the verdict."""
    rows = [("stage", "what", "img/s", "spread", "MB/s")]
    for f in result.figures:
        r = f.rate
        mb = r.mb_median
        rows.append((f.stage, f.label, num(r.median), f"{num(r.low)}..{num(r.high)}", "" if mb is None else num(mb)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    if result.verdict is not None:
        lines += ["", f"verdict ({result.verdict.limit}): {result.verdict.text}"]
    lines.append(f"load average {result.setup['load_before']:.1f} before, {result.setup['load_after']:.1f} after")
    return lines


def pyplot() -> Any:
    """matplotlib's pyplot for writing files (an optional dependency: BenchError without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'effitrain[plot]'") from None
    return plt


def plot(result: BenchResult, path: Path) -> None:
    """A horizontal bar chart of every figure (log scale, spread as error bars), the model
    step's rate as a vertical line: bars left of it cannot feed the model."""
    plt = pyplot()
    figs = result.figures
    medians = [f.rate.median for f in figs]
    errors = [[m - f.rate.low for m, f in zip(medians, figs)], [f.rate.high - m for m, f in zip(medians, figs)]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(figs) + 1.8))
    y = list(range(len(figs)))[::-1]
    ax.barh(y, medians, xerr=errors, color=[STAGE_COLOURS[f.stage] for f in figs], capsize=3)
    ax.set_yticks(y, [f"{f.stage}: {f.label}" for f in figs])
    ax.set_xscale("log")
    ax.set_xlabel("images/s (median of windows; bars: slowest..fastest window)")
    for yi, m, f in zip(y, medians, figs):
        ax.text(f.rate.high * 1.15, yi, num(m), va="center", fontsize=8)  # right of the spread
    ax.set_xlim(right=max(f.rate.high for f in figs) * 6)  # room for the last label
    model = next((f.rate.median for f in figs if f.key == "model.step"), None)
    if model is not None:
        ax.axvline(model, color=STAGE_COLOURS["model"], linestyle="--", linewidth=1, label="model step")
        ax.legend(loc="lower right", fontsize=8)
    title = f"effitrain bench: {result.data['path']} ({result.data['kind']}, {result.setup['device']})"
    if result.verdict is not None:
        title += f"\nlimit: {result.verdict.limit} ({result.verdict.factor:.1f}x)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
