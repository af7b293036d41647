"""`cpsam distill eval`: how well students reproduce their teacher, per image, per folder and overall.

    cpsam distill eval --teacher cyto_0 --student RUN/model.pt [--student RUN2] --images DIR [--gt [DIR]] --out REPORT

For every image the teacher and each student segment it through `cpsam.segment.Segmenter` (the path
`cpsam segment` runs). The teacher runs at `--diameter` or, without it, at its size model's estimate
(when it has one) or its own diameter; the students run, by default, at the diameter the teacher used
for that image (`--student-diameter own`: their own size model / diameter) and under the teacher's
inference rules (tiling and flow -> mask rules of cellpose 3 for a CPnet teacher, 4 for CP-SAM; their own
tile size), which a distilled student inherits (`--student-rules own`: the student's own rules).

Scores (`cpsam.metrics.score_image`; averaged over the images of a folder, the paper's rule, counts summed):
- against the teacher's masks: binarized IoU (foreground = mask > 0), object counts and relative count
  error |n_student - n_teacher| / n_teacher, AP and error rate at IoU 0.5 (0.75, 0.9 too);
- against ground truth (with `--gt`), for the teacher and every student.
`count_rel_error_total` is the relative error of the summed counts of a folder.

The teacher's agreement with itself (`teacher-mirrored`, on by default; `--no-mirror` skips it): the teacher
also segments each image mirrored left-right, its masks are mirrored back and scored against its own
masks like a student's. Mirroring is a symmetry of the task (the teacher was trained with flips), so this
is how far a model that *is* the teacher, seen in a mirror, agrees with it: the scale to read a student's
binarized IoU and count error against: where the teacher agrees with its own mirror image only partly (for
cyto_0: H&E and phase contrast, docs/results/distillation.md), no student can be expected to do better.
With `--teacher-augment` the teacher segments with flip test-time augmentation, and the same teacher without it
(`teacher-plain`) is scored against it too. Every row against the teacher carries `teacher_self_iou` (the
binarized IoU of `teacher-plain` when measured, else of `teacher-mirrored`, on that folder) and
`iou_vs_ceiling` = binary_iou / teacher_self_iou (`summaries`).

Seconds per image (end to end, in this process, after a warm-up image) are indicative only:
benchmarks/bench_students.py times models in isolated processes.

Inputs (`--images`, repeatable): a folder of images, a canonical dataset (index.csv + images/), or a
folder of such folders (each subfolder not starting with '_' or '.' is a folder of the report). Label
files beside the images (NAME_masks.tif for NAME.tif or NAME_img.tif, _seg.npy, ...; what
`cpsam finetune` finds) are never inputs. `--gt` alone uses those labels (or a canonical dataset's
masks) as ground truth; `--gt DIR` looks for NAME.* / NAME_masks.* in DIR (or DIR/FOLDER).

Writes into REPORT/ (all files or none): per_image.csv, summary.csv, report.md, agreement.png (binarized
IoU per folder, one bar per student), agreement_vs_speed.png. Exit codes: 0 done, 1 some image failed
(listed in the report and on stderr), 2 bad request (options, models, no images).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cpsam import io, pairing, shard
from cpsam.cli_types import non_negative_float, non_negative_int, positive_int, torch_device
from cpsam.metrics import ALL_DATASETS, DEFAULT_THRESHOLDS, ImageScores, score_image, summarize_by_dataset
from cpsam.models import ModelSpecError, resolve_model
from cpsam.report.tables import markdown_table, write_csv
from cpsam.segment import ImageError, InferenceRules, Segmenter, rules_for
from data_prep.canonical import read_index
from train.finetune import FinetuneError, find_labelled_images

TEACHER = "teacher"
MIRRORED = "teacher-mirrored"
PLAIN = "teacher-plain"
GROUND_TRUTH = "gt"
REPORT_FILES = ("per_image.csv", "summary.csv", "report.md", "agreement.png", "agreement_vs_speed.png")


class EvalError(RuntimeError):
    """A request that cannot be evaluated (no images, unreadable model, ...); one clear line."""


@dataclass(frozen=True)
class EvalImage:
    """One image to evaluate: its folder (the report's dataset), name, file and ground-truth file (or None)."""

    dataset: str
    name: str
    image: Path
    labels: Path | None = None


@dataclass
class ModelRun:
    """A model under evaluation: its report label, the Segmenter that runs it, the seconds it took per image."""

    label: str
    segmenter: Segmenter
    seconds: list[float] = field(default_factory=list)


@dataclass
class Evaluation:
    """Everything `evaluate` measured: per-image rows, (folder, scores) of each image per (model, reference),
    seconds per image per model, problems."""

    rows: list[dict[str, object]] = field(default_factory=list)
    results: dict[tuple[str, str], list[tuple[str, ImageScores]]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs


def _has_images(folder: Path) -> bool:
    labelled, unlabelled = find_labelled_images(folder)
    return bool(labelled or unlabelled)


def list_eval_images(folders: Sequence[Path], gt: str | None, split: str | None = None) -> list[EvalImage]:
    """The images of every folder (see module docstring), sorted by folder then name.

    gt: None (no ground truth), "auto" (labels that come with the images) or a folder of label files.
    split: keep only canonical-dataset rows of this split (e.g. "val"). Raises EvalError for a missing
    folder, a folder without images, or two images of one folder with the same name.
    """
    items: list[EvalImage] = []
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            raise EvalError(f"--images {root}: no such folder")
        groups = [root] if _has_images(root) else sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")) and _has_images(p))
        if not groups:
            suffixes = ", ".join(io.IMAGE_SUFFIXES)
            raise EvalError(f"--images {root}: no image files ({suffixes}) and no subfolder with any")
        for folder in groups:
            masks_dir = None
            if gt not in (None, "auto"):
                masks_dir = Path(gt) / folder.name if (Path(gt) / folder.name).is_dir() else Path(gt)
            try:
                labelled, unlabelled = find_labelled_images(folder, masks_dir)
            except FinetuneError as exc:
                raise EvalError(str(exc)) from exc
            splits = _canonical_splits(folder) if split is not None else None
            # a canonical dataset brings its own labels (e.g. the teacher's); --gt DIR replaces them by DIR's
            replace_labels = masks_dir is not None and (folder / "index.csv").is_file()
            for item in labelled:
                if splits is not None and splits.get(item.name, split) != split:
                    continue
                labels = item.labels if gt is not None else None
                if replace_labels:
                    labels = pairing.find_label(item.image, masks_dir)
                items.append(EvalImage(folder.name, item.name, item.image, labels))
            for path in unlabelled:
                name = path.stem[: -len("_img")] if path.stem.endswith("_img") else path.stem
                items.append(EvalImage(folder.name, name, path, None))
    return sorted(items, key=lambda it: (it.dataset, it.name))


def _canonical_splits(folder: Path) -> dict[str, str] | None:
    if not (folder / "index.csv").is_file():
        return None
    return {row.name: row.split for row in read_index(folder)}


# ----------------------------------------------------------------------------- models


def student_rules(student: nn.Module, teacher_rules: InferenceRules, mode: str = TEACHER) -> InferenceRules:
    """The rules a student runs under: the teacher's with the student's tile size ("teacher"), or its own."""
    if mode == "own":
        return rules_for(student)
    return dataclasses.replace(teacher_rules, tile_size=int(student.tile_size))


def load_models(teacher: str, students: Sequence[str], device: torch.device, batch_size: int,
                rules_mode: str = TEACHER) -> tuple[ModelRun, list[ModelRun]]:
    """(teacher, students) as ModelRuns; student labels are unique (a run folder's name for RUN/model.pt).

    Raises EvalError naming the model that cannot be loaded.
    """

    def load(spec: str, role: str) -> nn.Module:
        try:
            return resolve_model(spec, device)
        except ModelSpecError as exc:
            raise EvalError(f"cannot load --{role} {spec}: {exc}") from exc

    t_model = load(teacher, "teacher")
    t_run = ModelRun(TEACHER, Segmenter(t_model, device=device, batch_size=batch_size))
    runs, seen = [], {TEACHER}
    for spec in students:
        model = load(spec, "student")
        label = student_label(spec)
        while label in seen:
            label += "'"
        seen.add(label)
        seg = Segmenter(model, device=device, batch_size=batch_size,
                        rules=student_rules(model, t_run.segmenter.rules, rules_mode))
        runs.append(ModelRun(label, seg))
    return t_run, runs


def student_label(spec: str) -> str:
    """A short report label for a model spec: RUN for RUN/model.pt or a run folder, the file stem, or the name."""
    path = Path(spec)
    if path.is_dir() or path.name == "model.pt":
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem if path.suffix else spec


# ----------------------------------------------------------------------------- scoring


def score_row(item: EvalImage, model: str, reference: str, scores: ImageScores, seconds: float,
              diameter: float) -> dict[str, object]:
    """One per-image CSV row: where, which model against which reference, then every metric column."""
    row: dict[str, object] = {"dataset": item.dataset, "name": item.name, "model": model, "reference": reference,
                              "diameter": diameter, "seconds": seconds}
    row.update(scores.as_row())
    return row


def mirror_width(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`image` mirrored left-right: (H, W), (H, W, C) or (C, H, W) any dtype, where `shape` = (H, W) (the
    masks the image gave) tells a channel axis from the width axis. ImageError (a ValueError, which `evaluate`
    records as the image's problem) when neither layout fits."""
    if image.ndim == 2 and image.shape == shape:
        return np.ascontiguousarray(image[:, ::-1])
    if image.ndim == 3 and image.shape[:2] == shape:
        return np.ascontiguousarray(image[:, ::-1])
    if image.ndim == 3 and image.shape[1:] == shape:
        return np.ascontiguousarray(image[:, :, ::-1])
    raise ImageError(f"cannot find the width axis of an image of shape {image.shape} for masks of shape {shape}")


def _segment(run: ModelRun, image: np.ndarray, diameter: float | None, channels: Sequence[int] | None,
             augment: bool = False) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = run.segmenter.segment([image], diameter=diameter, channels=channels, augment=augment)[0]
    run.seconds.append(time.perf_counter() - start)
    return result.masks, result.diameter


def _counted(items: Sequence[EvalImage], bar: shard.RankProgress) -> Iterator[EvalImage]:
    """`items`, one `bar` step after each item's work (also for an item passed over)."""
    for item in items:
        yield item
        bar.update(1)


def evaluate(items: Sequence[EvalImage], teacher: ModelRun, students: Sequence[ModelRun], *,
             diameter: float | None = None, student_diameter: str = TEACHER,
             channels: Sequence[int] | None = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
             progress: bool = True, mirror: bool = False, teacher_augment: bool = False,
             bar: shard.RankProgress | None = None) -> Evaluation:
    """Segment every image with the teacher and each student and score them (see module docstring).

    diameter: cell diameter in px for the teacher (None: its size model / own diameter);
    student_diameter: "teacher" (the diameter the teacher used for that image) or "own";
    mirror: also score the teacher on the mirrored image, mirrored back, against itself (model MIRRORED).
    teacher_augment: the teacher segments with flip test-time augmentation (`Segmenter.segment(augment=True)`, what
    `cpsam segment --augment` and `cpsam distill cache --teacher-augment` use); the teacher without it is then
    scored against it too (model PLAIN).
    bar: count the images on this bar (one over all ranks, `cpsam.shard.RankProgress`) instead of an own one.
    An unreadable image, or ground truth that does not fit, is recorded in `problems` and passed over.
    The first image is segmented once more by every model before timing starts (warm-up).
    """
    out = Evaluation()
    mirrored = ModelRun(MIRRORED, teacher.segmenter)
    plain = ModelRun(PLAIN, teacher.segmenter)
    ta = teacher_augment
    warmed = False
    listed = (tqdm(items, desc="distill eval", unit="image", disable=not progress, file=sys.stderr) if bar is None
              else _counted(items, bar))
    for item in listed:
        try:
            image = io.read_image(item.image)
            truth = pairing.read_label_file(item.labels) if item.labels is not None else None
        except io.InputFileError as exc:
            out.problems.append(str(exc))
            continue
        try:
            if not warmed:
                for run in (teacher, *students):
                    run.segmenter.segment([image], diameter=diameter or 30.0, channels=channels, compute_masks=False)
                warmed = True
            t_masks, t_diam = _segment(teacher, image, diameter, channels, ta)
            s_out = [(run, *_segment(run, image, t_diam if student_diameter == TEACHER else diameter, channels))
                     for run in students]
            if mirror:  # at the teacher's diameter for the image, so only the mirror differs
                m_masks, _ = _segment(mirrored, mirror_width(image, t_masks.shape), t_diam, channels, ta)
                s_out.append((mirrored, np.ascontiguousarray(m_masks[:, ::-1]), t_diam))
            if ta:  # the same teacher without the augmentation, at the same diameter
                s_out.append((plain, _segment(plain, image, t_diam, channels)[0], t_diam))
        except ImageError as exc:
            out.problems.append(f"{item.image}: {exc}")
            continue
        if truth is not None and truth.shape != t_masks.shape:
            out.problems.append(f"{item.labels}: shape {truth.shape} does not match the image {t_masks.shape}")
            truth = None
        pairs: list[tuple[str, str, np.ndarray, np.ndarray, float, float]] = []
        for run, masks, diam in s_out:
            pairs.append((run.label, TEACHER, t_masks, masks, run.seconds[-1], diam))
        if truth is not None:
            pairs.append((TEACHER, GROUND_TRUTH, truth, t_masks, teacher.seconds[-1], t_diam))
            pairs += [(run.label, GROUND_TRUTH, truth, masks, run.seconds[-1], diam) for run, masks, diam in s_out
                      if run is not mirrored and run is not plain]
        for model, reference, ref_masks, masks, seconds, diam in pairs:
            scores = score_image(ref_masks, masks, thresholds)
            out.rows.append(score_row(item, model, reference, scores, seconds, diam))
            out.results.setdefault((model, reference), []).append((item.dataset, scores))
    extra = [*([mirrored] if mirror else []), *([plain] if ta else [])]
    out.seconds = {run.label: list(run.seconds) for run in (teacher, *students, *extra)}
    return out


def ceiling_model(evaluation: Evaluation) -> str | None:
    """The row whose binarized IoU with the teacher is the teacher's self-agreement: PLAIN (plain vs augmented) for
    an augmented teacher, else MIRRORED; None when neither was measured (`--no-mirror`)."""
    for model in (PLAIN, MIRRORED):
        if (model, TEACHER) in evaluation.results:
            return model
    return None


def merge_evaluations(items: Sequence[EvalImage], parts: Sequence[Evaluation]) -> Evaluation:
    """One Evaluation from the ranks' Evaluations of disjoint shares of `items`, in the order of `items` (the
    order one process gives): rows and each (model, reference)'s results sorted by their image's position,
    seconds and problems concatenated in rank order."""
    position = {(it.dataset, it.name): k for k, it in enumerate(items)}
    out = Evaluation()
    keyed_rows: list[tuple[int, dict[str, object]]] = []
    keyed_results: dict[tuple[str, str], list[tuple[int, tuple[str, ImageScores]]]] = {}
    for part in parts:
        # a rank appends one row and one results entry per (model, reference) and image, in the same order
        for key, entries in part.results.items():
            rows = [r for r in part.rows if (r["model"], r["reference"]) == key]
            keyed_results.setdefault(key, []).extend(
                (position[(str(r["dataset"]), str(r["name"]))], e) for r, e in zip(rows, entries, strict=True))
        keyed_rows += [(position[(str(r["dataset"]), str(r["name"]))], r) for r in part.rows]
        for model, seconds in part.seconds.items():
            out.seconds.setdefault(model, []).extend(seconds)
        out.problems += part.problems
    out.rows = [r for _, r in sorted(keyed_rows, key=lambda kr: kr[0])]  # stable: a row's image keeps its order
    out.results = {key: [e for _, e in sorted(v, key=lambda kv: kv[0])] for key, v in keyed_results.items()}
    return out


def summaries(evaluation: Evaluation) -> list[dict[str, object]]:
    """Per (model, reference): one row per folder plus `all` (`cpsam.metrics.summarize_by_dataset`), with the model,
    the reference, `count_rel_error_total` and the mean seconds per image of the model added, and, against the
    teacher, `teacher_self_iou` (the binarized IoU of `ceiling_model` with the teacher on that folder) and
    `iou_vs_ceiling` = binary_iou / teacher_self_iou (NaN without a ceiling; 1.0 is as faithful as the teacher
    is to itself, above 1 more)."""
    rows = []
    for (model, reference), results in evaluation.results.items():
        for row in summarize_by_dataset(results):
            n_true, n_pred = float(row["n_true"]), float(row["n_pred"])  # type: ignore[arg-type]
            seconds = evaluation.seconds.get(model) or [math.nan]
            rows.append({"model": model, "reference": reference, **row,
                         "count_rel_error_total": abs(n_pred - n_true) / max(n_true, 1.0),
                         "seconds_per_image": float(np.mean(seconds))})
    ceiling = ceiling_model(evaluation)
    self_iou = {r["dataset"]: float(r["binary_iou"]) for r in rows  # type: ignore[arg-type]
                if r["model"] == ceiling and r["reference"] == TEACHER}
    for row in rows:
        own = self_iou.get(row["dataset"], math.nan) if row["reference"] == TEACHER else math.nan
        row["teacher_self_iou"] = own
        row["iou_vs_ceiling"] = float(row["binary_iou"]) / own if own > 0 else math.nan  # type: ignore[arg-type]
    return rows


SUMMARY_COLUMNS = ("model", "dataset", "n_images", "n_true", "n_pred", "binary_iou", "teacher_self_iou",
                   "iou_vs_ceiling", "count_rel_error", "count_rel_error_total", "ap@0.5", "error_rate@0.5", "ap@0.75",
                   "seconds_per_image")


def report_markdown(evaluation: Evaluation, teacher_spec: str, student_specs: Sequence[str]) -> str:
    """The report: students vs teacher, vs ground truth (when any), per image, problems."""
    summary = summaries(evaluation)
    parts = ["# Distillation: students against their teacher",
             f"Teacher `{teacher_spec}`; students " + ", ".join(f"`{s}`" for s in student_specs) + ".",
             "Per-image values averaged over the images of each folder; counts summed. vs teacher: n_true is the "
             "teacher's count. Seconds: end to end per image in one process (indicative; see "
             "benchmarks/bench_students.py).",
             f"`{MIRRORED}` (when present): the teacher on each image mirrored left-right, its masks mirrored back, "
             "against its own masks: how far the teacher agrees with itself under a symmetry of the task, the "
             f"scale to read the students' agreement against. `{PLAIN}` (an augmented teacher): the same teacher "
             "without the flip augmentation, against the augmented one.",
             f"Ceiling: `teacher_self_iou` is the binarized IoU of `{ceiling_model(evaluation) or 'none measured'}` "
             "with the teacher on that folder; `iou_vs_ceiling` = binary_iou / teacher_self_iou (1.0: a student "
             "as faithful to the teacher as the teacher is to itself)."]
    for reference, title in ((TEACHER, "Students vs the teacher's masks"), (GROUND_TRUTH, "Against ground truth")):
        rows = [r for r in summary if r["reference"] == reference]
        if rows:
            parts += [f"## {title}", markdown_table(rows, SUMMARY_COLUMNS)]
    per_image = [r for r in evaluation.rows if r["reference"] == TEACHER]
    if per_image:
        cols = ["dataset", "name", "model", "n_true", "n_pred", "binary_iou", "count_rel_error", "ap@0.5",
                "error_rate@0.5", "seconds"]
        parts += ["## Per image (vs teacher)", markdown_table(per_image, cols)]
    if evaluation.problems:
        parts += [f"## Problems ({len(evaluation.problems)})", "\n".join(f"- `{p}`" for p in evaluation.problems)]
    return "\n\n".join(parts) + "\n"


def write_eval_report(out: Path, evaluation: Evaluation, teacher_spec: str, student_specs: Sequence[str]
                      ) -> list[Path]:
    """Write the REPORT_FILES into `out` (created) together: all of them or none (`cpsam.io.atomic_paths`)."""
    # matplotlib (a second of start-up) only when a report is drawn, not for `cpsam distill eval --help`
    from cpsam.report.plots import SpeedPoint, accuracy_speed_scatter, error_rate_bars

    io.check_output_dir(out)
    targets = [out / name for name in REPORT_FILES]
    summary = summaries(evaluation)
    vs_teacher = [r for r in summary if r["reference"] == TEACHER]
    by_model: dict[str, list[dict[str, object]]] = {}
    for row in vs_teacher:
        by_model.setdefault(str(row["model"]), []).append(row)
    points = [SpeedPoint(TEACHER, float(np.mean(evaluation.seconds.get(TEACHER) or [math.nan])), 1.0)]
    points += [SpeedPoint(model, float(rows[-1]["seconds_per_image"]), float(rows[-1]["binary_iou"]))  # type: ignore
               for model, rows in by_model.items()
               # PLAIN stays: with --teacher-augment it is the speed of the teacher a user deploys (the augmented
               # teacher runs four passes per image)
               if rows[-1]["dataset"] == ALL_DATASETS and model != MIRRORED]
    overall = [r for r in vs_teacher if r["dataset"] == ALL_DATASETS]
    ceiling = (float(overall[0]["teacher_self_iou"]), f"teacher's self-agreement ({ceiling_model(evaluation)})"  # type: ignore
               ) if overall else None
    with io.atomic_paths(targets) as temps:
        write_csv(temps[0], evaluation.rows)
        write_csv(temps[1], summary)
        temps[2].write_text(report_markdown(evaluation, teacher_spec, student_specs))
        error_rate_bars(by_model, temps[3], metric="binary_iou",
                        title="binarized IoU of each student with the teacher (higher is better)")
        accuracy_speed_scatter(points, temps[4], accuracy_label="binarized IoU vs teacher",
                               title="agreement with the teacher vs seconds per image", ceiling=ceiling)
    return targets


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam distill eval`."""
    parser.add_argument("--teacher", required=True, help="teacher: pretrained name, model file or run folder")
    parser.add_argument("--student", action="append", required=True, help="a student (model file, run folder, "
                        "pretrained name); repeat for several")
    parser.add_argument("--images", type=Path, action="append", required=True,
                        help="folder of images, canonical dataset, or folder of those; repeatable")
    parser.add_argument("--gt", nargs="?", const="auto", default=None, metavar="DIR",
                        help="score against ground truth: alone, the labels that come with the images; with DIR, "
                             "NAME.* / NAME_masks.* files in DIR (or DIR/FOLDER)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--split", default=None, help="canonical datasets: only rows of this split (e.g. val)")
    parser.add_argument("--diameter", type=non_negative_float, default=0.0,
                        help="cell diameter in px for the teacher (0: its size model's estimate or its own)")
    parser.add_argument("--student-diameter", choices=(TEACHER, "own"), default=TEACHER,
                        help="students run at the teacher's diameter for each image (default) or their own")
    parser.add_argument("--student-rules", choices=(TEACHER, "own"), default=TEACHER,
                        help="students run under the teacher's tiling and mask rules (default) or their own")
    parser.add_argument("--channels", type=non_negative_int, nargs=2, metavar=("SEG", "NUC"), default=None)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--device", type=torch_device, default=None)
    parser.add_argument("--no-mirror", dest="mirror", action="store_false",
                        help=f"skip the teacher's agreement with itself on mirrored images ({MIRRORED}; one more "
                             "teacher run per image)")
    parser.add_argument("--teacher-augment", action="store_true",
                        help=f"the teacher segments with flip test-time augmentation (as `cpsam segment --augment`; "
                             f"for students distilled with `cpsam distill cache --teacher-augment`); adds {PLAIN}, the "
                             "teacher without it, whose agreement is then the ceiling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """`cpsam distill eval`; returns the exit code (module docstring). Under `torchrun` / `accelerate launch`
    each rank evaluates its `cpsam.shard` share of the images on its own device and rank 0 merges the ranks'
    results (`merge_evaluations`) and writes the report."""
    ctx = shard.RankContext.from_env()
    with shard.process_group(ctx):
        code = _run(args, ctx)
        shard.barrier(ctx)  # the report is written before any rank exits (a launcher stops the rest)
    return code


def _run(args: argparse.Namespace, ctx: shard.RankContext) -> int:
    device = ctx.device(args.device)
    try:
        items = list_eval_images(args.images, args.gt, args.split)
        if not items:
            raise EvalError("no images to evaluate" + (f" in split {args.split!r}" if args.split else ""))
        io.check_output_dir(args.out)
        teacher, students = load_models(args.teacher, args.student, device, args.batch_size, args.student_rules)
    except (EvalError, io.OutputPathError) as exc:
        print(f"cpsam distill eval: {exc}", file=sys.stderr)
        return 2
    share = (range(len(items)) if ctx.world_size == 1  # one process: no header read for the sizes
             else shard.balanced_shares([shard.image_pixels(it.image) for it in items], ctx.world_size)[ctx.rank])
    bar = shard.RankProgress(ctx, 0 if args.quiet else len(items), desc="distill eval", unit="image")
    evaluation = evaluate([items[k] for k in share], teacher, students, diameter=args.diameter or None,
                          student_diameter=args.student_diameter, channels=args.channels, mirror=args.mirror,
                          teacher_augment=args.teacher_augment, bar=bar)
    bar.close()
    parts = shard.gather_to_main(ctx, evaluation)
    if parts is None:  # not rank 0: rank 0 reports
        return 1 if evaluation.problems else 0
    evaluation = merge_evaluations(items, parts)
    for problem in evaluation.problems:
        print(f"cpsam distill eval: skipped {problem}", file=sys.stderr)
    if not evaluation.rows:
        print("cpsam distill eval: no image could be evaluated", file=sys.stderr)
        return 1
    try:
        write_eval_report(args.out, evaluation, args.teacher, args.student)
    except (OSError, io.OutputPathError) as exc:
        print(f"cpsam distill eval: cannot write the report into {args.out}: {exc}", file=sys.stderr)
        return 1
    for row in summaries(evaluation):
        if row["dataset"] == ALL_DATASETS:
            vs = float(row["iou_vs_ceiling"])  # type: ignore[arg-type]
            ceiling = f" ({vs:.2f} of the teacher's self-agreement)" if math.isfinite(vs) else ""
            print(f"{row['model']:>24} vs {row['reference']:7}: binarized IoU {row['binary_iou']:.3f}{ceiling}, "
                  f"count error {row['count_rel_error']:.3f}, AP@0.5 {row['ap@0.5']:.3f}, "
                  f"{row['seconds_per_image']:.2f} s/image")
    print(f"cpsam distill eval: {len({(r['dataset'], r['name']) for r in evaluation.rows})} images -> {args.out}")
    return 1 if evaluation.problems else 0
