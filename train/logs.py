"""Run logs: `metrics.csv` (one row per logged step or validation) and `curves.png` at the end.

The CSV has a fixed header chosen when the run starts (training columns, then validation columns,
including one `val_ap50/DATASET` column per validation dataset); cells a row does not have are
empty. On resume, rows after the resumed step are dropped first (they were logged by the killed
process after its last checkpoint and will be logged again).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from cpsam.io import atomic_path

LOSS_TERMS = ("loss_flow", "loss_cellprob")  # the Cellpose objective's loss parts
VAL_COLUMNS = ("val_ap50", "val_ap75", "val_ap90", "val_err50", "val_ap50_pooled", "val_images")


def columns(val_dataset_names: Sequence[str], loss_terms: Sequence[str] = LOSS_TERMS,
            val_columns: Sequence[str] | None = None) -> list[str]:
    """The metrics.csv header of a run validating on these datasets: step, epoch, lr, loss, the objective's
    loss parts, grad_norm, samples_per_s, skipped_steps, seconds, then the validation columns (default:
    AP columns and one `val_ap50/DATASET` per dataset)."""
    if val_columns is None:
        val_columns = [*VAL_COLUMNS, *(f"val_ap50/{n}" for n in val_dataset_names)]
    return ["step", "epoch", "lr", "loss", *loss_terms, "grad_norm", "samples_per_s", "skipped_steps", "seconds",
            *val_columns]


class MetricsCSV:
    """Appends rows to run/metrics.csv (rank 0 only), flushing each row so a killed run keeps its log."""

    def __init__(self, path: str | os.PathLike[str], header: Sequence[str], resume_step: int | None) -> None:
        self.path = Path(path)
        self.header = list(header)
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if r.get("step") and int(float(r["step"])) <= resume_step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, float | int | str]) -> None:
        """Append one row (keys outside the header are ignored)."""
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.header, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a metrics.csv as floats (missing cells absent)."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return rows


def plot_curves(metrics_csv: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """curves.png: training loss (and smoothed), learning rate, validation AP@0.5/0.75/0.9 against step."""
    import matplotlib  # plotting libraries (~1 s) only when curves are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [r for r in rows if "val_ap50" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], lw=0.8, label="loss")
        axes[0].set_yscale("log")
        axes[1].plot(steps, [r["lr"] for r in train], lw=1.0)
    for key, label in (("val_ap50", "AP@0.5"), ("val_ap75", "AP@0.75"), ("val_ap90", "AP@0.9")):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=label)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].set(title="validation AP (per-image mean)", xlabel="step", ylim=(0, 1))
    if val:
        axes[2].legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(out_png)
