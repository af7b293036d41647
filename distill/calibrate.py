"""A distilled student's own flow threshold, calibrated against its teacher's masks on its training images.

Cellpose's last mask rule removes a mask when the flows recomputed from it differ from the network's flows by more
than `flow_threshold` (mean squared error; 0.4 by default, `cpsam.dynamics.flows_to_masks`). A student's flows are
a noisier copy of its teacher's, so under the teacher's threshold it drops masks that the teacher keeps: it finds
fewer cells and agrees less with the teacher than its flows and cell probabilities allow (measured in
docs/results/distillation.md). The threshold is part of the student's inference rules, so it is chosen for the
student:

- `calibrate_flow_threshold` runs the student once per image (at the diameter of the teacher's masks), turns its
  flows into masks under each threshold of a grid, scores them by AP@0.5 against the teacher's masks, and keeps the
  threshold with the best mean (the lowest one among equals). The images are the student's training images with
  the masks its teacher made for them: no held-out image and no manual mask is used.
- `record_flow_threshold` writes the choice into model.pt's inference record as `mask_thresholds`
  ({"flow_threshold": x, "source": ...}); `cpsam.segment.recorded_flow_threshold` applies it wherever a caller
  gives no threshold (`cpsam segment`, `Segmenter`, `cpsam distill eval`, the TorchScript and BioImage.IO exports).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from cpsam import io
from cpsam.metrics.scores import average_precision
from cpsam.models.loading import read_checkpoint, write_torch_file
from cpsam.segment import Segmenter

FLOW_THRESHOLD_GRID: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
CALIBRATION_FILE = "flow_threshold.csv"


@dataclass
class FlowThresholdCalibration:
    """The chosen threshold, the mean AP@0.5 against the teacher's masks per threshold of the grid, the number
    of images scored."""

    flow_threshold: float
    ap50: dict[float, float]
    n_images: int

    def line(self) -> str:
        """One line for the log: the choice and every threshold's score."""
        scores = ", ".join(f"{t:g}: {a:.3f}" for t, a in self.ap50.items())
        return (f"flow threshold {self.flow_threshold:g} (mean AP@0.5 against the teacher's masks on "
                f"{self.n_images} training images: {scores})")


def calibrate_flow_threshold(model: nn.Module, images: Sequence[np.ndarray], teacher_masks: Sequence[np.ndarray],
                             diameters: Sequence[float], *, channels: Sequence[int] | None = None,
                             channel_axis: int | None = None, grid: Sequence[float] = FLOW_THRESHOLD_GRID,
                             batch_size: int = 8,
                             progress: Callable[[int, int], None] | None = None) -> FlowThresholdCalibration:
    """Pick the flow threshold of `grid` under which `model`'s masks match `teacher_masks` best (module docstring).

    Args:
        model: the student (a cpsam segmentation model, eval mode).
        images: raw images as `Segmenter.segment` takes them; teacher_masks: (H, W) labels of the same images.
        diameters: per image, the cell diameter in px to segment at (the teacher's masks' median diameter).
        channels: cellpose-3 [SEG, NUC] channels (None: the model's recorded ones); channel_axis: of 3-D images
            (None: guessed, as `Segmenter.segment`).
        grid: thresholds to try (>= 0, at least one).
        progress: called as progress(done, total) after each image.
    Returns the choice and the mean AP@0.5 per threshold. Raises ValueError for an empty grid or image list, or
    lists of different lengths.
    """
    grid = [float(t) for t in grid]
    if not grid or min(grid) < 0:
        raise ValueError(f"the grid needs at least one threshold >= 0, got {grid}")
    if not images or not (len(images) == len(teacher_masks) == len(diameters)):
        raise ValueError(f"need as many images ({len(images)}), teacher masks ({len(teacher_masks)}) and "
                         f"diameters ({len(diameters)}), at least one")
    segmenter = Segmenter(model, batch_size=batch_size)
    scores = np.zeros((len(images), len(grid)))
    for n, (image, truth, diameter) in enumerate(zip(images, teacher_masks, diameters, strict=True)):
        result = segmenter.segment([image], diameter=float(diameter), channels=channels,
                                   channel_axis=channel_axis if image.ndim == 3 else None, compute_masks=False,
                                   estimate_diameters=False)[0]
        scores[n] = flow_threshold_scores(result.dP, result.cellprob, result.niter, np.asarray(truth), grid,
                                          segmenter.rules.mask_rules)
        if progress is not None:
            progress(n + 1, len(images))
    means = scores.mean(axis=0)
    best = int(np.argmax(means))  # the first (lowest, for an ascending grid) among equal means
    return FlowThresholdCalibration(grid[best], {t: float(m) for t, m in zip(grid, means, strict=True)}, len(images))


def flow_threshold_scores(dP: np.ndarray, cellprob: np.ndarray, niter: int, teacher_masks: np.ndarray,
                          grid: Sequence[float], rules: str) -> np.ndarray:
    """AP@0.5 against `teacher_masks` of the masks of one image's outputs under each threshold of `grid`.

    dP (2, H, W) flows at the network's 5x scale and cellprob (H, W) logits at the image's size (a SegmentResult's),
    niter Euler steps, rules "cp3" / "cp4": the masks are `cpsam.dynamics.flows_to_masks` (through
    `flows_to_masks_thresholds`: the Euler steps once for the whole grid) with the other defaults of
    `Segmenter.segment` (cellprob threshold 0, min_size 15, max_size_fraction 0.4). Returns (len(grid),) float64.
    """
    # numba (~1 s) loads with the first masks, as in Segmenter
    from cpsam.dynamics import flows_to_masks_thresholds

    masks = flows_to_masks_thresholds(dP, cellprob, [float(t) for t in grid], niter=int(niter), rules=rules)
    return average_precision([teacher_masks] * len(masks), masks, thresholds=[0.5])[0][:, 0]


def record_flow_threshold(model_path: str | os.PathLike[str], calibration: FlowThresholdCalibration,
                          source: str) -> Path:
    """Write `calibration.flow_threshold` into the checkpoint's inference record as mask_thresholds (atomically;
    the rest of the file unchanged) and the grid's scores beside it (flow_threshold.csv). Returns model_path."""
    path = Path(model_path)
    payload = dict(read_checkpoint(path))
    record = dict(payload.get("inference") or {})
    record["mask_thresholds"] = {"flow_threshold": float(calibration.flow_threshold), "source": source}
    payload["inference"] = record
    write_torch_file(path, payload)
    with io.atomic_path(path.parent / CALIBRATION_FILE) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["flow_threshold", "ap50_vs_teacher", "chosen"])
        for threshold, ap in calibration.ap50.items():
            writer.writerow([threshold, f"{ap:.6f}", int(threshold == calibration.flow_threshold)])
    return path

