"""Training curves and benchmark bar charts as PNG files.

Figures are built from `matplotlib.figure.Figure` directly, not pyplot: no global state
and no GUI backend, so plotting is safe on a headless node or inside a training process.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

# val keys drawn on the accuracy / recall panel (all are fractions in [0, 1])
_ACCURACY_KEY = re.compile(r"zeroshot_top\d+|zeroshot_mean_per_class|(image_to_text|text_to_image)_R@\d+|mean_recall")
_MARKER_MAX_POINTS = 30  # below this, mark every point (a lone point has no line to show)


def read_log(log_path: str | Path) -> tuple[list[dict], list[dict]]:
    """The train and val records of a JSONL log, each sorted by step.

    A line that does not parse (the last line of a run still writing) is skipped; a
    step logged twice (a resumed run) keeps its latest record.
    """
    records = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)

    def by_step(kind: str) -> list[dict]:
        latest = {r["step"]: r for r in records if r.get("kind") == kind}
        return [latest[step] for step in sorted(latest)]

    return by_step("train"), by_step("val")


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a number under `key`."""
    points = [
        (r["step"], r[key] * scale)
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return [s for s, _ in points], [v for _, v in points]


def _ema(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average; the window grows with the run
    (about 1/20 of it), so short runs are barely smoothed and long ones readably."""
    beta = min(0.98, max(0.0, 1 - 20 / max(len(values), 1)))
    smoothed, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * value
        smoothed.append(avg / (1 - beta**i) if beta else value)
    return smoothed


def _draw(ax: Axes, records: list[dict], keys: list[str], title: str, ylabel: str, scale: float = 1.0) -> None:
    """One line per key present in `records`, or a "no data" note."""
    drawn = 0
    for key in keys:
        steps, values = _series(records, key, scale)
        if steps:
            style = "--" if key.startswith("text_to_image") else "-"
            marker = "o" if len(steps) <= _MARKER_MAX_POINTS else None
            ax.plot(steps, values, style, marker=marker, markersize=3, label=key)
            drawn += 1
    _finish(ax, title, ylabel, has_data=drawn > 0, legend=drawn > 1 or len(keys) > 1)


def _finish(ax: Axes, title: str, ylabel: str, has_data: bool, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    elif legend and len(ax.get_legend_handles_labels()[1]) > 4:  # beside the panel: never on a line
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    elif legend:
        ax.legend(fontsize="small")


def _draw_train_loss(ax: Axes, train: list[dict]) -> None:
    steps, losses = _series(train, "loss")
    if steps:
        marker = "o" if len(steps) <= _MARKER_MAX_POINTS else None
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, marker=marker, markersize=3, label="raw")
        if len(steps) > 1:
            ax.plot(steps, _ema(losses), color="tab:blue", label="smoothed")
    _finish(ax, "train loss", "loss", has_data=bool(steps))


def plot_training_curves(log_path: str | Path, out_png: str | Path) -> Path:
    """One PNG of a run's JSONL log: train loss (raw and smoothed), validation loss,
    learning rate, throughput, and accuracy / recall (whichever keys the log has)."""
    train, val = read_log(log_path)
    fig = Figure(figsize=(12, 10), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    _draw_train_loss(fig.add_subplot(grid[0, 0]), train)
    _draw(fig.add_subplot(grid[0, 1]), val, ["val_loss"], "validation loss", "loss")
    lr_ax = fig.add_subplot(grid[1, 0])
    _draw(lr_ax, train, ["lr"], "learning rate", "lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _draw(fig.add_subplot(grid[1, 1]), train, ["samples_per_second"], "throughput", "samples / s")
    accuracy_keys = sorted({key for r in val for key in r if _ACCURACY_KEY.fullmatch(key)})
    _draw(fig.add_subplot(grid[2, :]), val, accuracy_keys, "zero-shot accuracy and retrieval recall", "%", 100.0)
    fig.suptitle(str(log_path))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def plot_bench_table(
    rows: list[dict],
    x_key: str,
    y_keys: list[str],
    out_png: str | Path,
    title: str = "",
    ylabel: str | None = None,
) -> Path:
    """Grouped bars: one group per row (labelled by `row[x_key]`), one bar per y key.

    The y keys share one axis, so give them one unit (e.g. samples/s of several setups).
    A missing or non-numeric value leaves a gap.
    """
    if not rows or not y_keys:
        raise ValueError("plot_bench_table needs at least one row and one y key")
    width = 0.8 / len(y_keys)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.4 * len(rows) * len(y_keys)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, key in enumerate(y_keys):
        values = [_number(row.get(key)) for row in rows]
        offset = (i - (len(y_keys) - 1) / 2) * width
        bars = ax.bar([j + offset for j in range(len(rows))], values, width, label=key)
        ax.bar_label(bars, labels=[f"{v:.3g}" if math.isfinite(v) else "" for v in values], fontsize=8)
    labels = [str(row.get(x_key, "?")) for row in rows]
    long_labels = max(map(len, labels)) > 12
    ax.set_xticks(range(len(rows)), labels, rotation=20 if long_labels else 0, ha="right" if long_labels else "center")
    ax.margins(y=0.1)  # headroom for the value labels
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel or (y_keys[0] if len(y_keys) == 1 else "value"))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(y_keys) > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never covers a bar
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def _number(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan
