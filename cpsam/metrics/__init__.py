"""Instance-segmentation metrics of label images: matching, AP, error rate and the paper's averaging.

The definitions (identical to `cellpose.metrics` and `stardist.matching.matching`) are in
`cpsam.metrics.scores`; the sparse overlap table and the optimal assignment in
`cpsam.metrics.matching`; per-dataset averaging in `cpsam.metrics.summary`. This is the one
implementation: validation during training, distillation reports and `cpsam eval` all score with it.
"""

from cpsam.metrics.matching import Assignment, Overlap, as_labels, assign, check_label_pair, label_overlap
from cpsam.metrics.scores import (
    COUNT_FIELDS,
    DEFAULT_THRESHOLDS,
    ERROR_RATE_THRESHOLD,
    THRESHOLD_FIELDS,
    ImageScores,
    ThresholdScores,
    aggregated_jaccard_index,
    aji_from_overlap,
    average_precision,
    binary_iou,
    binary_iou_from_overlap,
    error_rate,
    safe_ratio,
    score_image,
    score_overlap,
    threshold_scores,
)
from cpsam.metrics.summary import ALL_DATASETS, summarize_by_dataset

__all__ = [
    "ALL_DATASETS",
    "COUNT_FIELDS",
    "DEFAULT_THRESHOLDS",
    "ERROR_RATE_THRESHOLD",
    "THRESHOLD_FIELDS",
    "Assignment",
    "ImageScores",
    "Overlap",
    "ThresholdScores",
    "aggregated_jaccard_index",
    "aji_from_overlap",
    "as_labels",
    "assign",
    "average_precision",
    "binary_iou",
    "binary_iou_from_overlap",
    "check_label_pair",
    "error_rate",
    "label_overlap",
    "safe_ratio",
    "score_image",
    "score_overlap",
    "summarize_by_dataset",
    "threshold_scores",
]
