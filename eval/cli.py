"""`cpsam eval`: score predicted label images against ground truth (or against another prediction set).

    cpsam eval --pred PRED_DIR --gt GT_DIR [--out report.csv] [--compare DIR2] [--thresholds 0.5 0.75 0.9]

Exit code: 0 when every paired file was scored; 1 when a file could not be read or had the wrong
shape, or nothing could be paired; 2 for bad arguments. Missing and extra files are listed (stderr
and the Markdown report) but do not change the exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpsam.command import UsageError, interruptible
from cpsam.io import describe_os_error
from eval import pairing as pairing_mod
from eval import report

PAIRING_HELP = """\
pairing (cpsam.pairing, the rule prep, finetune and distill use too): label files are images
(.tif/.tiff/.png/.npy/.jpg/.jpeg/.bmp) or the Cellpose GUI's NAME_seg.npy anywhere under a folder
(folders starting with '.' or '_' are skipped). A file's name without extension and without a
trailing _masks, _cp_masks, _mask, _labels or _label is its key (NAME.tif, NAME_masks.tif and
NAME_cp_masks.png all pair as NAME; so does NAME_img_masks.tif: _img/_image before a marker is
dropped). In a tree where some files carry such a marker, only those are label files (NAME_img.tif
is ignored). Several label files of one key: the first in that order wins (a _seg.npy gives way to a
label image), the others are reported as names found more than once.
Files pair by (sub-folder, key), then by key alone when it is unique in both trees. The dataset of
a pair is the first sub-folder of its ground-truth file (the ground-truth folder's name at the top).

metrics: per image, at each IoU threshold, TP/FP/FN by optimal matching (as cellpose.metrics),
AP = TP/(TP+FP+FN), error rate = (FP+FN)/(TP+FN), precision, recall, F1, mean matched IoU, panoptic
quality (as StarDist); AJI; binary foreground IoU; object-count errors. Dataset rows average the
per-image values (the Cellpose-SAM paper's rule) and sum the counts.

outputs with --out R.csv: R.csv (per image, every column), R_summary.csv (dataset x metric), R.md
(both tables and the list of missing/extra/bad files), R_error_rate.png (bars per dataset).
--compare DIR2 also scores --pred against DIR2 (e.g. student vs teacher) into R_vs_<DIR2 name>.*;
without --gt only that is done."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam eval` (its sub-commands `paper` and `invariance` are eval/paper.py, eval/invariance.py)."""
    parser.epilog = PAIRING_HELP
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted label images")
    parser.add_argument("--gt", type=Path, help="folder of ground-truth label images")
    parser.add_argument(
        "--compare", type=Path, help="second prediction folder used as reference (student vs teacher)"
    )
    parser.add_argument("--out", type=Path, help="per-image CSV path; also writes _summary.csv and .md beside it")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.5, 0.75, 0.9],
        help="IoU thresholds (default 0.5 0.75 0.9); the summary shows AP at each, other metrics at the first",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-image table")


def _evaluate(pred: Path, ref: Path, title: str, out: Path | None, args: argparse.Namespace) -> int:
    """Pair, score, print and (with `out`) write one report. Returns the number of problems that fail."""
    pairing = pairing_mod.pair_files(pred, ref)
    results = report.score_pairs(pairing, args.thresholds, progress=not args.quiet)
    summary = report.summary_rows(results)
    cols = report.headline_columns(args.thresholds)
    print(f"\n## {title}\n")
    print(report.markdown_table(summary, cols) if summary else "no image could be scored")
    if not args.quiet and summary:
        print("\n" + report.markdown_table(report.image_rows(results), ["dataset", "name", *cols[2:]]))
    print(
        f"\n{len(results) - sum(r.error is not None for r in results)} of {len(pairing.pairs)} pairs scored; "
        f"{len(pairing.missing)} ground-truth files without prediction, {len(pairing.extra)} predictions "
        f"without ground truth, {sum(r.error is not None for r in results)} unreadable"
    )
    problems = report.problems_markdown(pairing, results)
    if problems:
        print("\n" + problems, file=sys.stderr)
    if out is not None:
        plot = None
        if summary:
            from cpsam.report.plots import error_rate_bars  # matplotlib only when a report is written

            metric = f"error_rate@{args.thresholds[0]:g}"

            def plot(png: Path) -> None:
                error_rate_bars({pred.name: summary}, png, metric=metric,
                                title=f"{metric} per dataset: {pred.name} vs {ref.name}")

        try:
            written = report.write_report(out, title, pairing, results, args.thresholds, plot=plot)
        except OSError as exc:
            print(f"cpsam eval: cannot write the report ({describe_os_error(exc)}); none of its files was "
                  "written", file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
    n_bad = sum(r.error is not None for r in results)
    return n_bad + (0 if summary else 1)


def _report_files(args: argparse.Namespace) -> list[Path]:
    """The --out CSV of each report this run writes (vs ground truth, vs --compare)."""
    if args.out is None:
        return []
    outs = [args.out] if args.gt is not None else []
    if args.compare is not None:
        outs.append(args.out if args.gt is None else args.out.with_name(
            f"{args.out.stem}_vs_{args.compare.resolve().name}{args.out.suffix or '.csv'}"
        ))
    return outs


def _check_arguments(args: argparse.Namespace) -> str | None:
    """The usage problem of these arguments (checked before any scoring), or None."""
    if args.gt is None and args.compare is None:
        return "give --gt DIR (ground truth) and/or --compare DIR2 (reference predictions)"
    for name in ("pred", "gt", "compare"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            return f"--{name} {folder}: not a folder"
    if any(not 0.0 < t <= 1.0 for t in args.thresholds):  # NaN fails this test too
        return f"thresholds must lie in (0, 1], got {args.thresholds}"
    # imported when this command runs, not for --help (start-up time)
    from cpsam.io import OutputPathError, check_output_file

    for out in _report_files(args):
        try:
            check_output_file(out)
        except OutputPathError as exc:
            return f"--out {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of `cpsam eval`; returns the exit code (130 / 143 when interrupted)."""
    problem = _check_arguments(args)
    if problem:
        raise UsageError(problem)
    outs = iter(_report_files(args))
    failures = 0
    with interruptible("the report in progress was not written"):
        if args.gt is not None:
            out = next(outs, None)
            failures += _evaluate(args.pred, args.gt, f"{args.pred} vs ground truth {args.gt}", out, args)
        if args.compare is not None:
            out = next(outs, None)
            failures += _evaluate(args.pred, args.compare, f"{args.pred} vs reference {args.compare}", out, args)
    return 1 if failures else 0
