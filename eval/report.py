"""Score paired label files and build the report tables (per image, per dataset) as CSV/Markdown.

Averaging follows the paper: every ratio (AP, error rate, precision, recall, F1, matched IoU, PQ,
AJI, binary IoU, relative count error) is computed per image and then averaged over the images of
a dataset; counts (TP, FP, FN, objects, absolute count error) are summed. The `all` row averages
over every image (not over dataset means).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cpsam.io import InputFileError, atomic_paths
from cpsam.metrics import ALL_DATASETS, DEFAULT_THRESHOLDS, ImageScores, score_image, summarize_by_dataset
from cpsam.pairing import read_label_file
from cpsam.report.tables import csv_text, markdown_table, write_csv
from eval.pairing import Pair, Pairing

__all__ = [  # markdown_table, write_csv and ALL_DATASETS are re-exported for eval's scripts and tests
    "ALL_DATASETS",
    "HEADLINE_METRICS",
    "ImageResult",
    "headline_columns",
    "image_rows",
    "markdown_table",
    "problems_markdown",
    "report_markdown",
    "report_paths",
    "score_pair",
    "score_pairs",
    "summary_rows",
    "write_csv",
    "write_report",
]


@dataclass(frozen=True)
class ImageResult:
    """Scores of one pair, or the reason it could not be scored."""

    pair: Pair
    scores: ImageScores | None
    error: str | None = None


def score_pair(pair: Pair, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ImageResult:
    """Read and score one pair; unreadable files or shape mismatches become `error` (naming the file)."""
    try:
        ref = read_label_file(pair.reference)
        pred = read_label_file(pair.prediction)
    except InputFileError as exc:
        return ImageResult(pair, None, str(exc))
    if ref.shape != pred.shape:
        return ImageResult(
            pair,
            None,
            f"{pair.prediction}: shape {pred.shape} does not match ground truth {pair.reference} {ref.shape}",
        )
    try:
        return ImageResult(pair, score_image(ref, pred, thresholds))
    except ValueError as exc:  # e.g. negative ids
        return ImageResult(pair, None, f"{pair.prediction} vs {pair.reference}: {exc}")


def score_pairs(
    pairing: Pairing, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, progress: bool = True
) -> list[ImageResult]:
    """Score every pair (tqdm progress bar on stderr)."""
    return [score_pair(p, thresholds) for p in tqdm(pairing.pairs, desc="scoring", unit="image", disable=not progress)]


def image_rows(results: Iterable[ImageResult]) -> list[dict[str, object]]:
    """One row per scored image: dataset, name, files, then every metric column."""
    rows = []
    for r in results:
        if r.scores is None:
            continue
        row: dict[str, object] = {
            "dataset": r.pair.dataset,
            "name": r.pair.key,
            "reference": str(r.pair.reference),
            "prediction": str(r.pair.prediction),
        }
        row.update(r.scores.as_row())
        rows.append(row)
    return rows


def summary_rows(results: Iterable[ImageResult]) -> list[dict[str, object]]:
    """One row per dataset (sorted) plus an `all` row: n_images, summed counts, per-image means
    (`cpsam.metrics.summarize_by_dataset` of the scored pairs; unscored ones are left out)."""
    return summarize_by_dataset((r.pair.dataset, r.scores) for r in results if r.scores is not None)


HEADLINE_METRICS: tuple[str, ...] = (
    "ap",
    "error_rate",
    "f1",
    "mean_matched_iou",
    "panoptic_quality",
)


def headline_columns(thresholds: Sequence[float]) -> list[str]:
    """The paper's table columns: AP at every threshold, then error rate and StarDist's metrics at
    the first threshold, then AJI, binary IoU and the relative count error."""
    first = f"{thresholds[0]:g}"
    cols = ["dataset", "n_images", "n_true", "n_pred"]
    cols += [f"ap@{t:g}" for t in thresholds]
    cols += [f"{m}@{first}" for m in HEADLINE_METRICS[1:]]
    cols += ["aji", "binary_iou", "count_rel_error"]
    return cols


def problems_markdown(pairing: Pairing, results: Sequence[ImageResult]) -> str:
    """Markdown sections listing bad files, missing and extra files, ambiguous names ('' if none)."""
    sections = []
    bad = [r.error for r in results if r.error]
    for title, items in (
        ("Files that could not be scored", bad),
        ("Ground-truth files without a prediction", [str(p) for p in pairing.missing]),
        ("Predictions without a ground-truth file", [str(p) for p in pairing.extra]),
        ("Names found more than once", pairing.duplicates),
    ):
        if items:
            sections.append(f"### {title} ({len(items)})\n\n" + "\n".join(f"- `{i}`" for i in items))
    return "\n\n".join(sections)


def report_markdown(
    title: str, pairing: Pairing, results: Sequence[ImageResult], thresholds: Sequence[float]
) -> str:
    """The whole Markdown report: summary (dataset x metric), per-image table, problems."""
    summary = summary_rows(results)
    per_image = image_rows(results)
    cols = headline_columns(thresholds)
    image_cols = ["dataset", "name", *cols[2:]]
    parts = [
        f"# {title}",
        "Per-image values averaged over the images of each dataset (the paper's rule); counts summed.",
        "## Summary",
        markdown_table(summary, cols) if summary else "_no image could be scored_",
        "## Per image",
        markdown_table(per_image, image_cols) if per_image else "_none_",
    ]
    problems = problems_markdown(pairing, results)
    if problems:
        parts += ["## Problems", problems]
    return "\n\n".join(parts) + "\n"


def report_paths(out_csv: Path) -> list[Path]:
    """The files of one report: `out_csv`, `<stem>_summary.csv`, `<stem>.md`, `<stem>_error_rate.png`."""
    out_csv = Path(out_csv)
    stem = out_csv.with_suffix("").name
    return [out_csv, *(out_csv.with_name(f"{stem}{tail}") for tail in ("_summary.csv", ".md", "_error_rate.png"))]


def write_report(
    out_csv: Path,
    title: str,
    pairing: Pairing,
    results: Sequence[ImageResult],
    thresholds: Sequence[float],
    *,
    plot: Callable[[Path], object] | None = None,
) -> list[Path]:
    """Write `out_csv` (per image, every column), `<stem>_summary.csv`, `<stem>.md` and, with `plot`
    (called with the path to draw the PNG into), `<stem>_error_rate.png`: all or none of them.

    The files are written to temporary names and renamed together at the end (`cpsam.io.atomic_paths`),
    so a full disk or an interruption never leaves a report without its tables. Returns the paths.
    """
    targets = report_paths(out_csv)[: 4 if plot is not None else 3]
    with atomic_paths(targets) as temps:
        temps[0].write_text(csv_text(image_rows(results)), newline="")
        temps[1].write_text(csv_text(summary_rows(results)), newline="")
        temps[2].write_text(report_markdown(title, pairing, results, thresholds))
        if plot is not None:
            plot(temps[3])
    return targets
