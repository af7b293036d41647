"""Per-dataset summaries of per-image scores, by the paper's averaging rule.

Every ratio (AP, error rate, precision, recall, F1, matched IoU, PQ, AJI, binary IoU, relative count
error) is computed per image and then averaged over the images of a dataset; counts (TP, FP, FN,
objects, absolute count error; `COUNT_FIELDS`) are summed. The `all` row (`ALL_DATASETS`) averages
over every image, not over dataset means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from cpsam.metrics.scores import COUNT_FIELDS, ImageScores

ALL_DATASETS = "all"


def _metric_name(column: str) -> str:
    return column.split("@")[0]


def summarize_by_dataset(scored: Iterable[tuple[str, ImageScores]]) -> list[dict[str, object]]:
    """One row per dataset (sorted) plus an `all` row: dataset, n_images, summed counts, per-image means.

    Args:
        scored: (dataset name, scores of one image) pairs; every image must have been scored at the
            same thresholds (the columns of the first image are the columns of the table).
    Returns:
        Rows {"dataset", "n_images", then every column of `ImageScores.as_row`}; [] when `scored` is empty.
    """
    rows = [(dataset, scores.as_row()) for dataset, scores in scored]
    if not rows:
        return []
    columns = list(rows[0][1])
    groups: dict[str, list[dict[str, float]]] = {}
    for dataset, row in rows:
        groups.setdefault(dataset, []).append(row)
    groups[ALL_DATASETS] = [row for _, row in rows]
    out = []
    for dataset in [*sorted(d for d in groups if d != ALL_DATASETS), ALL_DATASETS]:
        members = groups[dataset]
        summary: dict[str, object] = {"dataset": dataset, "n_images": len(members)}
        for col in columns:
            values = [row[col] for row in members]
            summary[col] = sum(values) if _metric_name(col) in COUNT_FIELDS else math.fsum(values) / len(values)
        out.append(summary)
    return out
