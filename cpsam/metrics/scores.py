"""The paper's instance-segmentation metrics for one pair of label images.

Definitions (identical to `cellpose.metrics` and `stardist.matching.matching`; tested against both):

* Matching at IoU threshold t: the optimal assignment of `cpsam.metrics.matching.assign` (Hungarian,
  maximise the number of pairs with IoU >= t, ties broken by total IoU). TP = matched pairs with
  IoU >= t, FP = n_pred - TP, FN = n_true - TP, where n counts the distinct non-zero ids present.
* "AP" (Cellpose papers, = StarDist's "accuracy") = TP / (TP + FP + FN).
* Error rate (Cellpose-SAM paper, headline at t = 0.5) = (FP + FN) / (TP + FN).
* precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN),
  mean matched IoU = sum of IoU over TP pairs / TP (StarDist's `mean_matched_score`),
  panoptic quality = sum of IoU over TP pairs / (TP + FP/2 + FN/2).
* Aggregated Jaccard index (cellpose's simplified AJI): assignment at t = 0.5 keeping every
  assigned pair, even below 0.5; sum of their intersections / |GT foreground U predicted foreground|.
* Binary IoU: |fg_a & fg_b| / |fg_a | fg_b| of the two foregrounds (labels > 0).
* Object counts: absolute error |n_pred - n_true|, relative error |n_pred - n_true| / n_true.

Empty images (no division-by-zero warnings, always a number):
* every ratio whose denominator is 0 is 0 — StarDist's rule; cellpose returns NaN for AP / AJI
  when both images are empty, which is the only place the values differ;
* except the error rate and the relative count error, whose denominator n_true is clamped to 1,
  so false positives on an empty ground truth still count as errors (FP / 1), and a correct empty
  prediction scores 0;
* and binary IoU, which is 1 when both foregrounds are empty (they agree perfectly).

Averaging over images (the paper's rule: every ratio is computed per image, then averaged; counts
are summed) is `cpsam.metrics.summary.summarize_by_dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cpsam.metrics.matching import Overlap, as_labels, assign, check_label_pair, label_overlap

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)
ERROR_RATE_THRESHOLD = 0.5


def safe_ratio(num: float, den: float) -> float:
    """num / den as a Python float, 0.0 when den == 0 (StarDist's convention)."""
    return float(num) / float(den) if den != 0 else 0.0


def error_rate(tp: int, fp: int, fn: int) -> float:
    """(FP + FN) / (TP + FN); an empty ground truth (TP + FN = 0) divides by 1 instead."""
    return float(fp + fn) / float(max(tp + fn, 1))


@dataclass(frozen=True)
class ThresholdScores:
    """Counts and ratios of one image at one IoU threshold (ratios are unitless floats)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    ap: float
    error_rate: float
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float
    panoptic_quality: float


@dataclass(frozen=True)
class ImageScores:
    """All metrics of one (ground truth, prediction) pair."""

    n_true: int
    n_pred: int
    per_threshold: tuple[ThresholdScores, ...]
    aji: float
    binary_iou: float
    count_abs_error: int
    count_rel_error: float

    def at(self, threshold: float) -> ThresholdScores:
        """The scores at `threshold` (must be one of the computed thresholds)."""
        for s in self.per_threshold:
            if abs(s.threshold - threshold) < 1e-9:  # np.arange(0.5, 1, 0.05) gives 0.7000000000000001
                return s
        have = [s.threshold for s in self.per_threshold]
        raise KeyError(f"threshold {threshold} not computed (have {have})")

    def as_row(self) -> dict[str, float]:
        """Flat {column: value} dict, columns like 'ap@0.5', 'error_rate@0.5', 'tp@0.75', 'aji'."""
        row: dict[str, float] = {"n_true": self.n_true, "n_pred": self.n_pred}
        for s in self.per_threshold:
            for field in THRESHOLD_FIELDS:
                row[f"{field}@{s.threshold:g}"] = getattr(s, field)
        row.update(
            aji=self.aji,
            binary_iou=self.binary_iou,
            count_abs_error=self.count_abs_error,
            count_rel_error=self.count_rel_error,
        )
        return row


THRESHOLD_FIELDS: tuple[str, ...] = (
    "tp",
    "fp",
    "fn",
    "ap",
    "error_rate",
    "precision",
    "recall",
    "f1",
    "mean_matched_iou",
    "panoptic_quality",
)
COUNT_FIELDS: frozenset[str] = frozenset({"tp", "fp", "fn", "n_true", "n_pred", "count_abs_error"})


def threshold_scores(ov: Overlap, threshold: float) -> ThresholdScores:
    """TP/FP/FN and the ratios derived from them at one IoU threshold."""
    match = assign(ov, threshold)
    tp = match.n_tp
    fp, fn = ov.n_pred - tp, ov.n_true - tp
    matched_iou = float(ov.iou[match.pairs[match.tp]].sum())
    return ThresholdScores(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        fn=fn,
        ap=safe_ratio(tp, tp + fp + fn),
        error_rate=error_rate(tp, fp, fn),
        precision=safe_ratio(tp, tp + fp),
        recall=safe_ratio(tp, tp + fn),
        f1=safe_ratio(2 * tp, 2 * tp + fp + fn),
        mean_matched_iou=safe_ratio(matched_iou, tp),
        panoptic_quality=safe_ratio(matched_iou, tp + fp / 2 + fn / 2),
    )


def aji_from_overlap(ov: Overlap) -> float:
    """Cellpose's aggregated Jaccard index from an overlap table (see module docstring)."""
    match = assign(ov, 0.5, full=True)
    return safe_ratio(int(ov.intersection[match.pairs].sum()), ov.foreground_union)


def binary_iou_from_overlap(ov: Overlap) -> float:
    """IoU of the two foregrounds; 1.0 when both are empty."""
    union = ov.foreground_union
    return ov.foreground_both / union if union else 1.0


def score_overlap(ov: Overlap, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ImageScores:
    """Every metric of one image pair from its overlap table."""
    diff = abs(ov.n_pred - ov.n_true)
    return ImageScores(
        n_true=ov.n_true,
        n_pred=ov.n_pred,
        per_threshold=tuple(threshold_scores(ov, t) for t in thresholds),
        aji=aji_from_overlap(ov),
        binary_iou=binary_iou_from_overlap(ov),
        count_abs_error=diff,
        count_rel_error=diff / max(ov.n_true, 1),
    )


def score_image(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> ImageScores:
    """Score a predicted label image against ground truth.

    Args:
        true, pred: same-shape integer label images (any integer dtype, 0 = background, ids need
            not be consecutive).
        thresholds: IoU thresholds (default 0.5, 0.75, 0.9).
    Raises:
        ValueError for a shape mismatch, non-integer dtype or negative ids.
    """
    return score_overlap(label_overlap(true, pred), thresholds)


def average_precision(
    masks_true: Sequence[np.ndarray] | np.ndarray,
    masks_pred: Sequence[np.ndarray] | np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AP, TP, FP, FN per image and threshold, the layout of `cellpose.metrics.average_precision`.

    Args:
        masks_true, masks_pred: one label image each, or equal-length lists of them.
    Returns:
        (ap, tp, fp, fn), float64 arrays of shape (n_images, n_thresholds), or (n_thresholds,) when
        single arrays were given.
    """
    single = isinstance(masks_true, np.ndarray)
    trues = [masks_true] if single else list(masks_true)
    preds = [masks_pred] if single else list(masks_pred)
    if len(trues) != len(preds):
        raise ValueError(f"{len(trues)} ground-truth images but {len(preds)} predictions")
    out = np.zeros((4, len(trues), len(thresholds)))
    for n, (t, p) in enumerate(zip(trues, preds, strict=True)):
        ov = label_overlap(t, p)
        for k, th in enumerate(thresholds):
            s = threshold_scores(ov, th)
            out[:, n, k] = (s.ap, s.tp, s.fp, s.fn)
    ap, tp, fp, fn = (x[0] if single else x for x in out)
    return ap, tp, fp, fn


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """Cellpose's aggregated Jaccard index of one image pair (0.0 when both are empty)."""
    return aji_from_overlap(label_overlap(true, pred))


def binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the foregrounds (label > 0) of two same-shape label images; 1.0 when both are empty."""
    a, b = as_labels(a), as_labels(b)
    check_label_pair(a, b)
    fa, fb = a > 0, b > 0
    union = int(np.count_nonzero(fa | fb))
    return int(np.count_nonzero(fa & fb)) / union if union else 1.0
