"""`cpsam demo`: the whole study at small scale, in one command, with the commands a researcher would type.

Steps (each one a `cpsam` command run in this process, so the demo shows the real tools at work):
1. teacher: `cpsam segment --model cyto_0` on the held-out images (masks, overlays);
2. fine-tune: `cpsam finetune --model cyto_0` briefly on a labelled split;
3. distill: `cpsam distill cache --teacher cyto_0` labels the unlabeled images and caches the teacher's outputs
   on K augmented views of each (their own masks are never written where the students can see them), then
   `cpsam distill --student S kd.cache=CACHE` trains two FastNet students from that one cache;
4. evaluate: `cpsam distill eval` of the fine-tuned model and the students on the held-out images: AP and
   error rate at IoU 0.5 against the ground truth, binarized IoU and object counts against the teacher,
   seconds per image; then `report.md` with the table and figures (overlays teacher vs student, metric bars,
   accuracy against speed).

Data: real annotated nuclei from ../shared/data (Cell Tracking Challenge HeLa and DeepCell 2016; or
$CPSAM_SHARED) when present: 256-px crops of the training images (labelled split and unlabeled pool come from
different HeLa images, and from different crops of the one DeepCell training image) and 384-px crops of held-out
images (never cropped for training). Without ../shared (a machine that has only PyPI), the images come
from what PyPI ships: synthetic fluorescence cells (data_prep.synthetic) and the DSB 2018 nuclei image of the
stardist wheel, and the demo says so.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from cpsam.cli import main
from cpsam.io import atomic_path, outline_overlay, read_image, write_labels
from data_prep.labels import relabel_consecutive
from data_prep.synthetic import SyntheticConfig, synthesize
from distill.evaluate import MIRRORED, PLAIN
from eval.report import ALL_DATASETS, markdown_table
from eval.samples import stardist_nuclei_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CPSAM_SHARED", REPO.parent / "shared")) / "data"
CROP = 256  # training crops (px)
HELDOUT_CROP = 384  # held-out crops (px): two per held-out image
# (folder, training images, held-out image): the held-out image is never cropped for training
REAL_SOURCES = (
    ("fluo_nuclei_ctc_N2DL-HeLa", ("Fluo-N2DL-HeLa_01_t013", "Fluo-N2DL-HeLa_01_t052", "Fluo-N2DL-HeLa_02_t075"),
     "Fluo-N2DL-HeLa_02_t079"),
    ("fluo_nuclei_deepcell2016", ("deepcell2016_training_nuclei_set4_crop",), "deepcell2016_training_nuclei_set5_crop"),
)


@dataclass
class StudyData:
    """Folders of the study: `labelled` (NAME_img.tif + NAME_masks.tif, fine-tuning), `unlabeled` (NAME.tif only,
    distillation), `heldout` (NAME.tif, evaluation) with their masks in `heldout_masks` (NAME_masks.tif)."""

    labelled: Path
    unlabeled: Path
    heldout: Path
    heldout_masks: Path
    source: str
    diameter: float | None = None  # px: what the teacher is told (None = its size model's estimate)
    notes: list[str] = field(default_factory=list)


def _crops(image: np.ndarray, masks: np.ndarray, n: int, rng: np.random.Generator,
           size: int = CROP) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` random size x size windows (image (H, W) or (H, W, C), masks (H, W)) holding cells, labels renumbered."""
    h, w = masks.shape
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        m = masks[y:y + size, x:x + size]
        if len(np.unique(m)) > 6:
            out.append((image[y:y + size, x:x + size], relabel_consecutive(m)))
    return out


def _write_pair(folder: Path, name: str, image: np.ndarray, masks: np.ndarray | None,
                mask_folder: Path | None = None) -> None:
    """NAME_img.tif + NAME_masks.tif in `folder`; NAME.tif alone without masks; with `mask_folder`, NAME.tif in
    `folder` and NAME_masks.tif in `mask_folder` (so that a folder of images holds images only)."""
    folder.mkdir(parents=True, exist_ok=True)
    if masks is None or mask_folder is not None:
        tifffile.imwrite(folder / f"{name}.tif", image)
        if masks is not None:
            mask_folder.mkdir(parents=True, exist_ok=True)
            write_labels(mask_folder / f"{name}_masks.tif", masks)
    else:
        tifffile.imwrite(folder / f"{name}_img.tif", image)
        write_labels(folder / f"{name}_masks.tif", masks)


def prepare_data(out: Path, seed: int = 0) -> StudyData:
    """Write the study's three image folders under out/data (replaced if present); see the module docstring."""
    root = out / "data"
    shutil.rmtree(root, ignore_errors=True)
    labelled, unlabeled, heldout = root / "labelled", root / "unlabeled", root / "heldout"
    heldout_masks = root / "heldout_masks"
    rng = np.random.default_rng(seed)
    if all((SHARED / folder).is_dir() for folder, _, _ in REAL_SOURCES):
        for folder, train_names, test_name in REAL_SOURCES:
            for i, name in enumerate(train_names):
                image = read_image(SHARED / folder / f"{name}_img.tif")
                masks = read_image(SHARED / folder / f"{name}_masks.tif")
                crops = _crops(image, masks, 4, rng)
                # the first training image of each folder is the labelled split, the others the unlabeled pool
                for k, (img, m) in enumerate(crops):
                    if i == 0 and len(train_names) > 1:
                        _write_pair(labelled, f"{name}_c{k}", img, m)
                    elif len(train_names) == 1 and k < 2:
                        _write_pair(labelled, f"{name}_c{k}", img, m)
                    else:
                        _write_pair(unlabeled, f"{name}_c{k}", img, None)
            test_image = read_image(SHARED / folder / f"{test_name}_img.tif")
            test_masks = read_image(SHARED / folder / f"{test_name}_masks.tif")
            for k, (img, m) in enumerate(_crops(test_image, test_masks, 2, rng, HELDOUT_CROP)):
                _write_pair(heldout, f"{test_name}_c{k}", img, m, heldout_masks)
        return StudyData(labelled, unlabeled, heldout, heldout_masks,
                         f"real nuclei from {SHARED} (CTC HeLa, DeepCell 2016)")
    cfg = SyntheticConfig(shape=(CROP, CROP), diameter=24.0, modality="fluorescence")
    for k in range(12):
        image, masks = synthesize(cfg, seed=100 + k)
        if k < 4:
            _write_pair(labelled, f"synthetic_{k}", image, masks)
        elif k < 10:
            _write_pair(unlabeled, f"synthetic_{k}", image, None)
        else:
            _write_pair(heldout, f"synthetic_{k}", image, masks, heldout_masks)
    notes = [f"{SHARED} is absent: synthetic cells (data_prep.synthetic) stand in for real training images"]
    nuclei = stardist_nuclei_sample()
    if nuclei is not None:
        _write_pair(heldout, nuclei.name, nuclei.image, nuclei.masks, heldout_masks)
        notes.append("held-out real image: the DSB 2018 nuclei image of the stardist wheel")
    return StudyData(labelled, unlabeled, heldout, heldout_masks, "synthetic cells + the stardist wheel's DSB image",
                     notes=notes)


def _cpsam(argv: list[str]) -> None:
    """Run one `cpsam` command in this process; SystemExit with its message when it fails."""
    print(f"\n$ cpsam {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"cpsam demo: `cpsam {' '.join(argv)}` failed with exit code {code}")


@dataclass(frozen=True)
class StudyScale:
    """How long each training runs (epochs x samples per epoch at batch 8) and how many teacher views the
    distillation cache holds per unlabeled crop. The default fits 10 minutes on 2 CPU cores; `--scale`
    multiplies the epochs (e.g. 3 for a better result in half an hour)."""

    finetune_epochs: int = 4
    finetune_samples: int = 16
    distill_epochs: int = 16
    distill_samples: int = 64
    cache_views: int = 4


# Two FastNets: a CPnet student runs its 32-channel convolutions at full resolution, a FastNet at half or below,
# so only FastNets learn enough in the demo's minutes on a CPU (docs/results/demo.md); the CPnet students are in
# scripts/distill_study.sh.
STUDENTS = ("fastnet-1-32-64-128-256", "fastnet-1-16-32-64-128")


def distill_overrides(scale: StudyScale) -> list[str]:
    """The demo's distillation settings (key=value): the paper schedule compressed to `distill_epochs` (one
    warm-up epoch, lr/10 for the last quarter, lr/100 for the last eighth), the feature term down-weighted
    (kd.alpha 0.05: the cyto_0 decoder map's MSE is ~60, it would otherwise take the whole short budget) and the
    teacher's masks as a ground-truth term; data in the main process (2 cores: workers only compete)."""
    e = scale.distill_epochs
    return ["schedule.kind=paper", f"schedule.epochs={e}", f"schedule.samples_per_epoch={scale.distill_samples}",
            "schedule.warmup_epochs=1", f"schedule.decay1_epochs={max(1, e // 4)}",
            f"schedule.decay2_epochs={max(1, e // 8)}", "kd.alpha=0.05", "kd.gt_weight=1",
            f"val.every_epochs={e}", "data.num_workers=0"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(v: str | None) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def study_table(summary_csv: Path) -> list[dict[str, object]]:
    """One row per model from `cpsam distill eval`'s summary.csv (folder 'all'): AP@0.5 and error rate against
    the ground truth, binarized IoU, the teacher's self-agreement (its ceiling) and the binarized IoU as a fraction
    of it, counts and relative count error against the teacher, seconds per image. The teacher's self-agreement
    rows (MIRRORED, PLAIN) are read as the ceiling, not listed as models."""
    rows = [r for r in _read_csv(summary_csv) if r["dataset"] == ALL_DATASETS]
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if m not in (MIRRORED, PLAIN)]
    out = []
    for m in models:
        gt = next((r for r in rows if r["model"] == m and r["reference"] == "gt"), {})
        vt = next((r for r in rows if r["model"] == m and r["reference"] == "teacher"), {})
        out.append({
            "model": m, "AP@0.5 (GT)": _float(gt.get("ap@0.5")),
            "error rate@0.5 (GT)": _float(gt.get("error_rate@0.5")),
            "binarized IoU (teacher)": _float(vt.get("binary_iou")) if vt else 1.0,
            "teacher self-IoU": _float(vt.get("teacher_self_iou")) if vt else float("nan"),
            "IoU / ceiling": _float(vt.get("iou_vs_ceiling")) if vt else float("nan"),
            "cells": int(_float(gt.get("n_pred"))) if gt else -1,
            "count error (teacher)": _float(vt.get("count_rel_error_total")) if vt else 0.0,
            "s / image": _float(gt.get("seconds_per_image") or vt.get("seconds_per_image")),
        })
    return out


def print_study_table(rows: list[dict[str, object]]) -> str:
    """The printed study table (also returned as text)."""
    cols = list(rows[0])
    widths = [max(len(c), 10) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for r in rows:
        cells = []
        for c, w in zip(cols, widths, strict=True):
            v = r[c]
            cells.append((f"{v:.3f}" if isinstance(v, float) else str(v)).rjust(w))
        lines.append("  ".join(cells))
    text = "\n".join(lines)
    print("\n" + text)
    return text


def _overlay_pair(image_path: Path, teacher_masks: Path, student_masks: Path, out_png: Path, title: str) -> Path:
    """Side by side: the teacher's outlines and a student's outlines on one held-out image."""
    import matplotlib  # plotting libraries (~1 s) only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = read_image(image_path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, masks, name in ((axes[0], teacher_masks, "teacher (cyto_0)"), (axes[1], student_masks, title)):
        labels = read_image(masks)
        ax.imshow(outline_overlay(image, labels))
        ax.set_title(f"{name}: {int(labels.max())} cells", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png


def _metric_bars(rows: list[dict[str, object]], out_png: Path) -> Path:
    import matplotlib  # plotting libraries (~1 s) only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["model"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(names, [r["AP@0.5 (GT)"] for r in rows], color="tab:blue")
    axes[0].set(title="AP@0.5 against ground truth", ylim=(0, 1))
    axes[1].bar(names, [r["binarized IoU (teacher)"] for r in rows], color="tab:green")
    axes[1].set(title="binarized IoU with the teacher", ylim=(0, 1))
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png


def run_study(out: Path, scale: StudyScale = StudyScale(), seed: int = 0) -> list[dict[str, object]]:
    """Steps 1-4 of the module docstring into `out`; returns the study table rows (also in out/report.md)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out, seed)
    print(f"study data: {data.source}")
    for note in data.notes:
        print(f"note: {note}")
    n_lab = len(list(data.labelled.glob("*_masks.tif")))
    n_unl = len(list(data.unlabeled.glob("*.tif")))
    n_held = len(list(data.heldout.glob("*.tif")))
    print(f"{n_lab} labelled crops (fine-tuning), {n_unl} unlabeled crops (distillation), {n_held} held-out images")
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    timings: dict[str, float] = {}

    def step(name: str, argv: list[str]) -> None:
        t0 = time.perf_counter()
        _cpsam(argv)
        timings[name] = time.perf_counter() - t0

    step("1 teacher segments", ["segment", "--model", "cyto_0", "--input", str(data.heldout),
                                "--output", str(runs / "teacher")])
    step("2 fine-tune", ["finetune", "--model", "cyto_0", "--images", str(data.labelled), "--out",
                         str(runs / "finetuned"), "--size-epochs", "2", "--seed", str(seed),
                         f"schedule.epochs={scale.finetune_epochs}",
                         f"schedule.samples_per_epoch={scale.finetune_samples}",
                         f"val.every_epochs={scale.finetune_epochs}", "log.progress=true"])
    # one teacher pass for both students: the teacher labels the unlabeled crops and its outputs on K augmented
    # views of each are cached (fp16); the students then train from the cache, never running the teacher
    cache = runs / "teacher_cache"
    step("3 teacher cache", ["distill", "cache", "--teacher", "cyto_0", "--images", str(data.unlabeled),
                             "--out", str(cache), "--views", str(scale.cache_views)])
    for student in STUDENTS:
        step(f"3 distill {student}", [
            "distill", "--student", student, "--out", str(runs / student), f"kd.cache={cache}",
            "--size-epochs", "1", "--seed", str(seed), *distill_overrides(scale)])
    report = out / "evaluation"
    shutil.rmtree(report, ignore_errors=True)
    step("4 evaluate", ["distill", "eval", "--teacher", "cyto_0", "--student", str(runs / "finetuned" / "model.pt"),
                        *[a for s in STUDENTS for a in ("--student", str(runs / s / "model.pt"))],
                        "--images", str(data.heldout), "--gt", str(data.heldout_masks), "--out", str(report),
                        "--quiet"])  # with the teacher's mirror agreement: the ceiling of the students' agreement
    rows = study_table(report / "summary.csv")
    # distill eval labels a model by its run folder's name
    names = {"teacher": "teacher cyto_0", "finetuned": "fine-tuned cyto_0", **{s: f"student {s}" for s in STUDENTS}}
    for r in rows:
        r["model"] = names.get(str(r["model"]), r["model"])
    rows.sort(key=lambda r: (not str(r["model"]).startswith("teacher"), not str(r["model"]).startswith("fine")))
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    _metric_bars(rows, figures / "metrics.png")
    first = sorted(data.heldout.glob("*.tif"))[0]
    stem = first.name[: -len(".tif")]
    overlays = []
    for s in STUDENTS:
        seg_out = runs / f"{s}_segment"
        _cpsam(["segment", "--model", str(runs / s / "model.pt"), "--input", str(first), "--output", str(seg_out)])
        overlays.append(_overlay_pair(first, runs / "teacher" / f"{stem}_masks.tif", seg_out / f"{stem}_masks.tif",
                                      figures / f"overlay_{s}.png", f"student {s}"))
    print_study_table(rows)
    total = time.perf_counter() - start
    lines = [
        "# The study at small scale: teacher, fine-tuning, distillation, evaluation", "",
        f"Data: {data.source}; {n_lab} labelled crops for fine-tuning, {n_unl} unlabeled crops for distillation "
        f"(the students never see a mask), {n_held} held-out images for the table.",
        *[f"Note: {n}" for n in data.notes],
        "", markdown_table(rows, list(rows[0])), "",
        "GT = the held-out images' manual masks; teacher = cyto_0's masks on the same images. Teacher self-IoU = "
        "the binarized IoU of cyto_0 on the mirrored images (masks mirrored back) with its own masks, the ceiling "
        "of any student's agreement; IoU / ceiling = binarized IoU (teacher) / teacher self-IoU. Students run at the "
        "diameter the teacher's size model estimated for each image, so the teacher's seconds include that estimate "
        "(a second network pass) and the others' do not. Seconds per image: end to end in one process "
        "(indicative; `python -m benchmarks.bench_students` times each model in a fresh process).", "",
        "## Figures", "", "![metrics](figures/metrics.png)", "",
        *[f"![{p.stem}](figures/{p.name})" for p in overlays], "",
        "![agreement vs speed](evaluation/agreement_vs_speed.png)", "",
        "## Steps and seconds", "", *[f"- {k}: {v:.0f} s" for k, v in timings.items()], f"- total: {total:.0f} s", "",
        "Commands: see the `$ cpsam ...` lines printed by the demo; the runs are in `runs/` (each one resumable).",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"\nstudy done in {total:.0f} s; report: {out / 'report.md'} (figures in {figures})")
    return rows
