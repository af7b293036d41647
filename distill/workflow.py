"""The `cpsam distill` workflow: teacher + images (labelled or not) -> a trained student checkpoint.

    result = distill(["cyto_0"], Path("images/"), "cpnet-1-32-64", Path("runs/s"), overrides=["schedule.epochs=20"])

Steps (each visible in RUN):
1. data: a folder of images without masks is labelled by the teacher into RUN/data/<folder> (distill.pseudo_labels:
   one canonical dataset per source folder, a seeded train / val split per folder); a canonical dataset (or a folder
   of them, e.g. the RUN/data of an earlier run) is used as it is; with kd.cache=CACHE the cache's datasets;
2. the run config (`distill_config`): objective distill, the student at the teacher's diam_mean, crops rescaled
   so cells are at the teacher's diam_mean (train.data.TrainDataset, cellpose's scale 0.75-1.25, rotation, flip),
   the crop size of the teacher, validation by AP against the data's masks (the teacher's) with the teacher's mask
   rules, and what inference needs recorded in kd.* / val.*; any key=value overrides it;
3. optional seed search (the seed's `find_seed`): N seeds trained one epoch each in RUN/seed_search/, the best by
   validation KD loss (val_kd_loss) is trained;
4. training through the one loop (train.loop.train): RUN/model.pt, checkpoints, metrics.csv, curves.png; a rerun
   of the same command resumes;
5. the student's own flow threshold (distill.calibrate, `kd.calibrate_flow_threshold`): the threshold of a grid
   under which its masks match the teacher's best (AP@0.5) on up to CALIBRATION_IMAGES training images, recorded
   in RUN/model.pt, where `cpsam segment` applies it;
6. a classic size model for the student (train.size_fit, as `cpsam finetune` does) fitted on the training images
   and their teacher masks, saved as RUN/model.pt_size.npy, so `cpsam segment --model RUN` estimates diameters.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cpsam import io
from cpsam.models import list_models, load_model
from cpsam.segment import calibrated_flow_threshold
from data_prep.canonical import CanonicalDataset
from distill.cache import TeacherCache
from distill.calibrate import calibrate_flow_threshold, record_flow_threshold
from distill.objective import check_kd
from distill.pseudo_labels import PseudoLabelError, canonical_roots, labelling_settings, pseudo_label
from distill.teachers import Teacher
from train.augment import AugmentConfig
from train.checkpoint import last_dir, load_state
from train.config import ConfigError, TrainConfig, apply_overrides
from train.degrade import DegradeConfig
from train.loop import train
from train.run_folder import claim_run_folder
from train.schedule import ScheduleConfig
from train.size_fit import fit_size_model


class DistillError(RuntimeError):
    """A distillation request that cannot run (no data, bad student, ...); one clear line."""


@dataclass
class DataPlan:
    """Where the run's data are: data.train folders, data.val folders, images left out ('PATH: why')."""

    train_roots: list[Path]
    val_roots: list[Path]
    left_out: list[str] = field(default_factory=list)
    n_train: int = 0


@dataclass
class DistillResult:
    """What `distill` did: the run folder, its model file, the best validation AP@0.5 against the data's masks,
    the seed trained, the seed-search rows (seed, val_kd_loss), seconds, the size model file (or None), the
    final metrics, the student's calibrated flow threshold (None when not calibrated)."""

    run: Path
    model_path: Path
    best_ap50: float | None
    seed: int
    seed_search: list[tuple[int, float]]
    seconds: float
    size_model_path: Path | None
    final_metrics: dict[str, float]
    flow_threshold: float | None = None


def distill_pipeline(teacher_diam_mean: float) -> tuple[AugmentConfig, DegradeConfig]:
    """The default crops of distillation: cells brought to the teacher's diam_mean, then cellpose's scale
    0.75-1.25, rotation and flip; no intensity jitter, no degradation (what the teacher saw at inference)."""
    augment = AugmentConfig(scale_mode="range", scale_range=0.5, rescale_to_diam_mean=True,
                            diam_mean=float(teacher_diam_mean), intensity=False)
    return augment, DegradeConfig(fraction=0.0)


def _n_train_rows(roots: Sequence[Path], split: str = "train") -> int:
    return sum(len(CanonicalDataset(r, split=split)) for r in roots)


def plan_data(teacher: Teacher, images: Path | None, run_data: Path, *, cache: TeacherCache | None = None,
              val_fraction: float = 0.2, seed: int = 0, diameter: float | None = None,
              channels: Sequence[int] | None = None, rules: dict | None = None, progress: bool = True) -> DataPlan:
    """Step 1 of the module docstring. Raises DistillError when there are no usable training images."""
    if cache is not None:
        roots = [Path(p) for p in cache.datasets]
        given = canonical_roots(images) if images is not None else None
        if images is not None and (given is None or [str(p.resolve()) for p in given] != cache.datasets):
            raise DistillError(f"--images {images} is not the data of kd.cache={cache.root} ({cache.datasets}); "
                               "leave --images out to train on the cache's data")
        return DataPlan(roots, [Path(p) for p in cache.val_datasets], n_train=len(cache.examples))
    if images is None:
        raise DistillError("give --images (a folder of images, with or without masks) or kd.cache=CACHE")
    roots = canonical_roots(images)
    if roots is not None:
        train = [r for r in roots if len(CanonicalDataset(r, split="train"))]
        val = [r for r in roots if len(CanonicalDataset(r, split="val"))]
        if not train:
            raise DistillError(f"--images {images}: no training rows (split 'train') in its index.csv")
        return DataPlan(train, val, n_train=_n_train_rows(train))
    rules = rules or {}
    try:
        labelled = pseudo_label(teacher, images, run_data, val_fraction=val_fraction, seed=seed, diameter=diameter,
                                channels=channels, progress=progress, **rules)
    except PseudoLabelError as exc:
        raise DistillError(str(exc)) from exc
    return DataPlan(labelled.train_roots, labelled.val_roots, labelled.left_out, labelled.n_train)


def distill_config(teacher: Teacher, student: str, run: Path, plan: DataPlan, *, seed: int = 0,
                   channels: Sequence[int] | None = None, diameter: float | None = None, rules: dict | None = None,
                   overrides: Sequence[str] = ()) -> TrainConfig:
    """The run config (step 2 of the module docstring), then `overrides`. Raises ConfigError for a bad override.

    Defaults: batch 8, AdamW lr 0.005 / wd 1e-5 (cellpose 3's classic fine-tuning), cellpose's schedule over
    100 epochs of min(800, max(64, 8 x training images)) samples, validation every 10 epochs, checkpoints every
    100 steps; kd.* = the seed's loss (alpha 2, beta 1, feature MSE).
    """
    rules = rules or {}
    augment, degrade = distill_pipeline(teacher.diam_mean)
    cfg = TrainConfig(objective="distill", batch_size=8, seed=int(seed), output_dir=str(run), augment=augment,
                      degrade=degrade)
    cfg.model.name = student
    cfg.model.diam_mean = teacher.diam_mean
    cfg.data.train = [str(p) for p in plan.train_roots]
    cfg.data.val = [str(p) for p in plan.val_roots]
    cfg.data.tile_size = teacher.tile_size
    cfg.data.min_train_masks = 1
    cfg.optim.lr, cfg.optim.weight_decay = 0.005, 1e-5
    cfg.schedule = ScheduleConfig(kind="cellpose", epochs=100, samples_per_epoch=min(800, max(64, 8 * plan.n_train)))
    cfg.val.every_epochs = 10
    cfg.val.flow_threshold = float(rules.get("flow_threshold", cfg.val.flow_threshold))
    cfg.val.cellprob_threshold = float(rules.get("cellprob_threshold", cfg.val.cellprob_threshold))
    cfg.val.niter = rules.get("niter", cfg.val.niter)
    cfg.val.mask_rules = teacher.rules.mask_rules  # the teacher's flow -> mask rules, recorded in model.pt
    cfg.checkpoint.every_steps = 100
    cfg.kd.teacher = list(teacher.specs)
    cfg.kd.channels = list(channels) if channels is not None else None
    cfg.kd.diameter = float(diameter or 0.0)
    cfg = apply_overrides(cfg, list(overrides))
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if "model.diam_mean" not in given:  # kd.student_scale: the student's cells are that much smaller
        cfg.model.diam_mean = teacher.diam_mean * cfg.kd.student_scale
    return cfg


def steps_per_epoch(cfg: TrainConfig) -> int:
    """Optimizer steps per epoch of `cfg` (samples_per_epoch rounded up to whole global batches)."""
    return int(math.ceil(cfg.schedule.samples_per_epoch / cfg.batch_size))


def seed_search(cfg: TrainConfig, n: int, progress: bool = True) -> list[tuple[int, float]]:
    """The seed's `find_seed`: `n` seeds (drawn from cfg.seed), each trained for one epoch of `cfg` in
    RUN/seed_search/seed_S, scored by val_kd_loss; returns [(seed, val_kd_loss)] in the order tried and writes
    RUN/seed_search.csv. Raises DistillError without validation data or kd.val_crops = 0."""
    if not cfg.data.val or cfg.kd.val_crops < 1:
        raise DistillError("--seed-search needs validation images (data.val) and kd.val_crops >= 1")
    seeds = [int(s) for s in np.random.default_rng(cfg.seed).choice(np.arange(1, 1_000_000), n, replace=False)]
    run = Path(cfg.output_dir)
    rows = []
    for s in seeds:
        trial = replace(cfg, seed=s, output_dir=str(run / "seed_search" / f"seed_{s}"),
                        max_steps=steps_per_epoch(cfg), val=replace(cfg.val, every_epochs=1),
                        log=replace(cfg.log, progress=progress, tensorboard=False))
        train(trial)
        # the trial's last validation, as checkpointed (a rerun finds finished trials and does not validate again)
        state = load_state(last_dir(trial.output_dir)) or {}
        rows.append((s, float((state.get("metrics") or {}).get("val_kd_loss", float("nan")))))
        print(f"cpsam distill: seed search: seed {s}: val_kd_loss {rows[-1][1]:.4f}", file=sys.stderr)
    with io.atomic_path(run / "seed_search.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seed", "val_kd_loss"])
        writer.writerows(rows)
    return rows


# At most this many training images score the flow thresholds (evenly spread over the training rows, which are
# listed folder by folder), so the calibration's time stays bounded on large pools (its time on proof A:
# docs/results/distillation.md).
CALIBRATION_IMAGES = 24


def calibration_rows(plan: DataPlan, limit: int = CALIBRATION_IMAGES) -> tuple[CanonicalDataset, list[int]]:
    """The training rows that calibrate the flow threshold: rows with teacher masks (median diameter > 0), at most
    `limit`, evenly spaced over the list."""
    ds = CanonicalDataset(plan.train_roots, split="train")
    usable = [i for i in range(len(ds)) if ds[i].n_objects > 0 and ds[i].median_diameter > 0]
    if len(usable) > limit:
        usable = [usable[int(k)] for k in np.linspace(0, len(usable) - 1, limit).round()]
    return ds, usable


def calibrate_student(run: Path, plan: DataPlan, channels: Sequence[int] | None, progress: bool = True) -> float | None:
    """Calibrate RUN/model.pt's flow threshold on its training images and teacher masks and record it there
    (distill.calibrate); a model.pt that has one already (a rerun of a finished run) is left as it is. Returns the
    threshold (None when no training row has masks)."""
    path = run / "model.pt"
    student = load_model(path)
    done = calibrated_flow_threshold(student)
    if done is not None:
        return done
    ds, rows = calibration_rows(plan)
    if not rows:
        return None
    bar = tqdm(total=len(rows), desc="flow threshold", disable=not progress, leave=False)
    calibration = calibrate_flow_threshold(
        student, [ds.image(i) for i in rows], [ds.mask(i) for i in rows],
        [float(ds[i].median_diameter) for i in rows], channels=channels, channel_axis=0,  # CanonicalDataset: (C, H, W)
        progress=lambda done, total: bar.update(1))
    bar.close()
    record_flow_threshold(path, calibration, f"calibrated on {calibration.n_images} training images against the "
                                             "teacher's masks (distill.calibrate)")
    print(f"cpsam distill: {calibration.line()} -> {path}", file=sys.stderr)
    return calibration.flow_threshold


def fit_student_size_model(run: Path, plan: DataPlan, n_epochs: int, seed: int, progress: bool = True) -> Path | None:
    """Fit and save RUN/model.pt_size.npy for a student with a style vector (None for other students)."""
    path = run / "model.pt_size.npy"
    if path.is_file() and path.stat().st_mtime >= (run / "model.pt").stat().st_mtime:
        return path  # fitted for this model.pt already (a rerun of a finished run)
    student = load_model(run / "model.pt")
    if not int(getattr(student, "style_channels", 0) or 0):
        return None
    ds = CanonicalDataset(plan.train_roots, split="train")
    report = fit_size_model(student, [ds.image(i) for i in range(len(ds))], [ds.mask(i) for i in range(len(ds))],
                            n_epochs=n_epochs, seed=seed, progress=progress)
    path = report.size_model.save(path)
    print(f"cpsam distill: student size model fitted on {report.n_samples} crops (train correlation "
          f"{report.train_correlation:.3f}) -> {path}", file=sys.stderr)
    return path


def _labels_settings(images: Path | None, cache: TeacherCache | None) -> dict | None:
    """The teacher.json of already labelled data (a cache's CACHE/data, or --images = an earlier RUN/data)."""
    folder = cache.root / "data" if cache is not None else images
    return labelling_settings(folder) if folder is not None and canonical_roots(folder) is not None else None


# The default student and recipe (`cpsam distill` without --student), chosen from the measurements in
# docs/results/distillation.md (cyto_0 teacher, the shared images, 2 CPU cores): of the students measured, the one
# that trains within 20 minutes and is >= 5x faster than the teacher with the best agreement and AP against manual
# masks: fastnet-1-32-64-128-256 from scratch, 1200 steps in 18 min from an 8-view cache, AP@0.5 0.428 against the
# teacher's 0.427, 42x faster end to end. (cpnet-1-32-64 at kd.student_scale=0.5 agreed slightly more, 0.610 vs
# 0.601, but took 24 minutes; the cyto_0 twins agree most, 0.83, but are under 5x faster.)
# kd.gt_weight=0: the student learns the teacher's raw outputs and features only, no Cellpose loss on the teacher's
# masks; with its calibrated flow threshold (distill.calibrate) that student agreed more with the teacher, and
# scored higher against manual masks, on every pool measured (docs/results/distillation.md, 2026-12-07).
DEFAULT_STUDENT = "fastnet-1-32-64-128-256"
DEFAULT_RECIPE = ("schedule.kind=paper", "schedule.epochs=100", "schedule.samples_per_epoch=96",
                  "schedule.warmup_epochs=2", "schedule.decay1_epochs=20", "schedule.decay2_epochs=10",
                  "kd.alpha=0.05", "kd.gt_weight=0")


def _recipe_value(key: str) -> str:
    return next(o.split("=", 1)[1] for o in DEFAULT_RECIPE if o.split("=", 1)[0] == key)


# The samples the default recipe trains on (schedule.epochs x schedule.samples_per_epoch).
DEFAULT_RECIPE_SAMPLES = int(_recipe_value("schedule.epochs")) * int(_recipe_value("schedule.samples_per_epoch"))

# `cpsam distill cache --views auto`: how many times, at most, the default recipe should draw each cached view, and
# the views per image it may choose. Why these values (views drawn a few times each beat views drawn tens of times,
# from the same teacher labels): docs/results/distillation.md. 8 draws gives 32 views to pools of up to 38 training
# images, then about 1,200 views in all, down to the floor of 4 views per image from 300 images on.
AUTO_VIEW_DRAWS = 8
AUTO_VIEWS_RANGE = (4, 32)


def default_views(n_train_images: int) -> int:
    """Views per image for `--views auto`: ceil(DEFAULT_RECIPE_SAMPLES / (AUTO_VIEW_DRAWS * n_train_images)),
    clipped to AUTO_VIEWS_RANGE (n_train_images <= 0 counts as 1)."""
    low, high = AUTO_VIEWS_RANGE
    wanted = math.ceil(DEFAULT_RECIPE_SAMPLES / (AUTO_VIEW_DRAWS * max(1, int(n_train_images))))
    return int(min(high, max(low, wanted)))


def with_default_recipe(overrides: Sequence[str]) -> list[str]:
    """DEFAULT_RECIPE's key=value pairs whose keys `overrides` does not set, followed by `overrides` (theirs win)."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [o for o in DEFAULT_RECIPE if o.split("=", 1)[0] not in given] + list(overrides)


def distill(teacher: Teacher, images: Path | None, student: str, out: Path, *, overrides: Sequence[str] = (),
            val_fraction: float = 0.2, seed: int = 0, diameter: float | None = None,
            channels: Sequence[int] | None = None, rules: dict | None = None, seed_search_n: int = 0,
            size_epochs: int = 10, progress: bool = True) -> DistillResult:
    """Run the whole workflow (module docstring). Raises DistillError, ConfigError, train.loop.TrainingError."""
    start = time.perf_counter()
    try:
        peek = apply_overrides(TrainConfig(), list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"bad key=value override: {exc}") from exc
    check_kd(peek.kd)  # bad kd.* values and student names are refused before the teacher labels anything
    if student not in list_models():
        raise DistillError(f"--student {student!r} is not a registered model; known: {', '.join(list_models())}")
    cache = TeacherCache(peek.kd.cache) if peek.kd.cache else None
    claim_run_folder(out, "distill", {
        "teacher": [Path(s) if Path(s).exists() else s for s in teacher.specs],
        "images": None if images is None else Path(images), "student": student, "val_fraction": val_fraction,
        "seed": seed, "diameter": diameter, "channels": None if channels is None else list(channels),
        "rules": dict(rules or {}), "seed_search": seed_search_n})
    plan = plan_data(teacher, images, out / "data", cache=cache, val_fraction=val_fraction, seed=seed,
                     diameter=diameter, channels=channels, rules=rules, progress=progress)
    print(f"cpsam distill: {plan.n_train} training images in {len(plan.train_roots)} folder(s), validation in "
          f"{len(plan.val_roots)} folder(s)", file=sys.stderr)
    made = _labels_settings(images, cache)
    if made is not None:  # teacher-labelled data: record the channels, diameter and mask rules that made the labels
        channels, diameter, rules = made["channels"], made["diameter"] or None, dict(made["rules"])
    cfg = distill_config(teacher, student, out, plan, seed=seed, channels=channels, diameter=diameter, rules=rules,
                         overrides=overrides)
    if cache is not None:  # the cache fixes the crops: the run takes its pipeline unless told otherwise
        spec = cache.pipeline_spec()
        given = {o.split("=", 1)[0] for o in overrides}
        if not any(k.startswith(("augment.", "degrade.", "data.tile_size")) for k in given):
            cfg.augment, cfg.degrade, cfg.data.tile_size = spec.augment, spec.degrade, spec.tile_size
    searched: list[tuple[int, float]] = []
    if seed_search_n > 0:
        searched = seed_search(cfg, seed_search_n, progress)
        finite = [r for r in searched if math.isfinite(r[1])]
        if finite:
            cfg = replace(cfg, seed=min(finite, key=lambda r: r[1])[0])
            print(f"cpsam distill: seed search chose seed {cfg.seed}", file=sys.stderr)
    cfg.log.progress = progress
    result = train(cfg)  # a stop signal raises train.loop.RunStopped: nothing below runs
    flow_threshold = None
    if result.is_main and cfg.kd.calibrate_flow_threshold and (out / "model.pt").is_file():
        flow_threshold = calibrate_student(out, plan, cfg.kd.channels, progress)
    size_path = None
    if result.is_main and size_epochs > 0 and (out / "model.pt").is_file():
        size_path = fit_student_size_model(out, plan, size_epochs, cfg.seed, progress)
    return DistillResult(out, out / "model.pt", result.best_ap50, cfg.seed, searched, time.perf_counter() - start,
                         size_path, dict(result.final_metrics), flow_threshold)
