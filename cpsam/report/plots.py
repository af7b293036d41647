"""Figures for reports: per-dataset error-rate bars and the accuracy-speed scatter (matplotlib, Agg).

Both write a PNG atomically and return its path; nothing is shown on screen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402 - must follow the backend choice
import numpy as np  # noqa: E402

from cpsam.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def error_rate_bars(
    summaries: Mapping[str, Sequence[Mapping[str, object]]],
    path: Path,
    *,
    metric: str = "error_rate@0.5",
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Grouped bar chart of `metric` per dataset, one bar colour per model.

    Args:
        summaries: model name -> summary rows of `cpsam.metrics.summarize_by_dataset` (each with a 'dataset'
            key and `metric`); datasets are the union over models, in first-seen order, `all` last.
        path: output PNG path.
        metric: summary column to plot (default the paper's error rate at IoU 0.5; lower is better).
    Returns:
        The written path.
    """
    datasets: list[str] = []
    for rows in summaries.values():
        for row in rows:
            name = str(row["dataset"])
            if name not in datasets:
                datasets.append(name)
    if "all" in datasets:
        datasets.remove("all")
        datasets.append("all")
    n_models = max(len(summaries), 1)
    width = 0.8 / n_models
    x = np.arange(len(datasets))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(datasets) * max(1, n_models / 2) + 2), 4.5))
    for k, (model, rows) in enumerate(summaries.items()):
        by_name = {str(r["dataset"]): float(r[metric]) for r in rows if metric in r}
        values = np.array([by_name.get(d, np.nan) for d in datasets])
        bars = ax.bar(x + (k - (n_models - 1) / 2) * width, values, width, label=model)
        ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "" for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, datasets, rotation=30, ha="right")
    better = " (lower is better)" if metric.startswith(("error_rate", "count_")) else ""
    ax.set_ylabel(metric.replace("_", " ") + better)
    ax.set_title(title or f"{metric.replace('_', ' ')} per dataset (mean over images)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    if len(summaries) > 1:
        ax.legend(frameon=False)
    return _save(fig, path, dpi)


@dataclass(frozen=True)
class SpeedPoint:
    """One model on the accuracy-speed plane."""

    name: str
    seconds_per_image: float  # wall time per image (or per megapixel; say so in `speed_label`)
    accuracy: float  # e.g. AP@0.5 (higher is better) or error rate (lower is better)


def accuracy_speed_scatter(
    points: Sequence[SpeedPoint],
    path: Path,
    *,
    accuracy_label: str = "AP@0.5",
    speed_label: str = "seconds per image",
    title: str | None = None,
    log_x: bool = True,
    dpi: int = 120,
    ceiling: tuple[float, str] | None = None,
) -> Path:
    """Scatter of accuracy (y) against run time (x, log scale by default), each point labelled.

    Args:
        points: models to plot; `seconds_per_image` must be > 0 for a log axis.
        path: output PNG path.
        ceiling: (accuracy, label) drawn as a dashed horizontal line (e.g. a teacher's self-agreement); a NaN
            value draws nothing.
    Returns:
        The written path.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = np.array([p.seconds_per_image for p in points], float)
    ys = np.array([p.accuracy for p in points], float)
    ax.scatter(xs, ys, s=60, c=np.arange(len(points)), cmap="viridis", zorder=3, edgecolors="black")
    for p in points:
        ax.annotate(p.name, (p.seconds_per_image, p.accuracy), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if log_x and len(xs) and np.all(xs > 0):
        ax.set_xscale("log")
    if ceiling is not None and np.isfinite(ceiling[0]):
        ax.axhline(ceiling[0], color="grey", linestyle="--", linewidth=1, zorder=2, label=ceiling[1])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(speed_label)
    ax.set_ylabel(accuracy_label)
    ax.set_title(title or f"{accuracy_label} vs speed")
    ax.grid(alpha=0.3, which="both")
    ax.margins(0.15)
    return _save(fig, path, dpi)
