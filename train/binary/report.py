"""Reports of binary runs: RUN/history.csv + RUN/history.png (loss and Jaccard), and the comparison of runs.

`write_history(run)` derives history.csv from the loop's metrics.csv (one row per logged step; validation
columns filled on the steps that validated). `plot_history` draws the two panels the seed's logs show: the
training loss, and the Jaccard index (the training batches' against their target, and the validation IoU).
`compare_models` scores several models on the same images (pooled foreground IoU, Dice, precision, recall and
the time per image) and writes one table (compare.csv, compare.md) and one figure (compare.png).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpsam.io import atomic_path
from train.binary.objective import image_counts
from train.binary.predict import cell_probability, load_binary_model, predict_probabilities
from train.logs import read_metrics

HISTORY_COLUMNS = ("step", "epoch", "lr", "loss", "loss_ce", "loss_kd", "dice", "jaccard", "val_iou", "val_dice",
                   "val_precision", "val_recall")
COMPARE_COLUMNS = ("run", "model", "iou", "dice", "precision", "recall", "images", "seconds_per_image")


def write_history(run: str | os.PathLike[str]) -> Path:
    """RUN/history.csv from RUN/metrics.csv: HISTORY_COLUMNS that the run has, one row per step (atomic)."""
    run = Path(run)
    by_step: dict[int, dict[str, float]] = {}
    for row in read_metrics(run / "metrics.csv"):
        if "step" in row:
            by_step.setdefault(int(row["step"]), {}).update(row)
    present = [c for c in HISTORY_COLUMNS if any(c in r for r in by_step.values())]
    path = run / "history.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(present)
        for step in sorted(by_step):
            r = by_step[step]
            writer.writerow([(f"{r[c]:.6g}" if c in r else "") for c in present])
    return path


def _ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta ** (i + 1)))
    return out


def plot_history(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """RUN/history.png (or `out`): training loss (raw and smoothed) | Jaccard of training batches and val IoU."""
    import matplotlib  # only when a figure is drawn (start-up time); Agg before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = read_metrics(run / "metrics.csv")
    train_rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val_rows = [r for r in rows if "val_iou" in r]
    fig, (ax_loss, ax_jac) = plt.subplots(1, 2, figsize=(11, 3.8))
    if train_rows:
        steps = [r["step"] for r in train_rows]
        ax_loss.plot(steps, [r["loss"] for r in train_rows], lw=0.7, alpha=0.5, label="loss")
        ax_loss.plot(steps, _ema([r["loss"] for r in train_rows]), lw=1.5, label="smoothed")
        jac = [(r["step"], r["jaccard"]) for r in train_rows if "jaccard" in r]
        if jac:
            ax_jac.plot(*zip(*jac, strict=True), lw=0.7, alpha=0.6, label="training batches")
    if val_rows:
        ax_jac.plot([r["step"] for r in val_rows], [r["val_iou"] for r in val_rows], "o-", label="validation IoU")
    for line in (*ax_loss.lines, *ax_jac.lines):
        if len(line.get_xdata()) < 3:
            line.set_marker("o")
    ax_loss.set(title="training loss", xlabel="step")
    ax_jac.set(title="Jaccard index (foreground IoU)", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_jac):
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = Path(out) if out is not None else run / "history.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


@dataclass(frozen=True)
class EvalImage:
    """One image to score: its name, raw pixels (H, W) or (C, H, W), truth (H, W) labels or classes (> 0 = cell)."""

    name: str
    image: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True)
class ModelScore:
    """Pooled foreground scores of one model on a set of images, and its mean inference time per image (s)."""

    run: str
    model: str
    tp: float
    fp: float
    fn: float
    images: int
    seconds_per_image: float

    @property
    def iou(self) -> float:
        """TP / (TP + FP + FN)."""
        return self.tp / max(self.tp + self.fp + self.fn, 1.0)

    @property
    def dice(self) -> float:
        """2 TP / (2 TP + FP + FN)."""
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1.0)

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return self.tp / max(self.tp + self.fp, 1.0)

    @property
    def recall(self) -> float:
        """TP / (TP + FN)."""
        return self.tp / max(self.tp + self.fn, 1.0)


def score_model(path: str | os.PathLike[str], images: Sequence[EvalImage], *, device: str | torch.device = "cpu",
                tile: int | None = None, threshold: float = 0.5) -> ModelScore:
    """Score the binary model at `path` (model.pt or run folder) on `images`: pooled pixel counts, time per image
    (inference only: model loading excluded)."""
    net, code = load_binary_model(path, device)
    counts = np.zeros(3)
    seconds = 0.0
    for item in images:
        t0 = time.perf_counter()
        prob = cell_probability(predict_probabilities(net, item.image, code, tile=tile, device=device))
        seconds += time.perf_counter() - t0
        counts += image_counts(prob, item.truth, threshold=threshold)
    p = Path(path)
    run = p.parent if p.name == "model.pt" else p
    return ModelScore(str(run), str(net.model_name), *counts.tolist(), len(images), seconds / max(len(images), 1))


def write_comparison(scores: Sequence[ModelScore], out: str | os.PathLike[str]) -> list[Path]:
    """OUT/compare.csv, OUT/compare.md (one table) and OUT/compare.png (grouped bars of IoU, Dice, precision,
    recall per run); returns the three paths."""
    import matplotlib  # only when a figure is drawn (start-up time); Agg before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"run": s.run, "model": s.model, "iou": s.iou, "dice": s.dice, "precision": s.precision,
             "recall": s.recall, "images": s.images, "seconds_per_image": s.seconds_per_image} for s in scores]
    paths = [folder / "compare.csv", folder / "compare.md", folder / "compare.png"]
    with atomic_path(paths[0]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    lines = ["| run | model | IoU | Dice | precision | recall | images | s / image |", "|---" * 8 + "|"]
    lines += [f"| {r['run']} | {r['model']} | {r['iou']:.3f} | {r['dice']:.3f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['images']} | {r['seconds_per_image']:.2f} |" for r in rows]
    with atomic_path(paths[1]) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    metrics = ("iou", "dice", "precision", "recall")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 3), 4))
    width = 0.8 / max(len(rows), 1)
    for k, r in enumerate(rows):
        ax.bar(np.arange(len(metrics)) + k * width, [r[m] for m in metrics], width, label=Path(r["run"]).name)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2, ["IoU", "Dice", "precision", "recall"])
    ax.set(ylim=(0, 1), title=f"foreground metrics on the same {rows[0]['images'] if rows else 0} images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(paths[2]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths
