"""The user fine-tuning workflow: a model + a folder of your labelled images -> a better model.

    cpsam finetune --model cyto_0 --images my_images/ --out runs/mine [--masks DIR] [--val-fraction 0.2]
                   [--diameter D] [--channels SEG NUC] [key=value ...]

Steps (each visible in RUN):
1. labels are found the way users keep them (`find_labelled_images`): a --masks folder, or beside
   each image NAME_masks.*, NAME_cp_masks.*, NAME_mask.*, NAME_labels.*, or the Cellpose GUI's
   NAME_seg.npy; a canonical dataset folder (index.csv) is used as it is;
2. a seeded random split (`train.txt`, `val.txt`) and a canonical dataset of the pairs in RUN/data
   (images in the model's input channels, `--channels` applied);
3. the base model is scored on the validation images (AP at 0.5/0.75/0.9, error rate at 0.5);
4. training through the one loop (`train.loop.train`) with the preset of the model kind
   (`finetune_config`): cellpose 4's fine-tuning defaults for CP-SAM, cellpose 3's for classic
   models; any config key can be overridden;
5. classic models: a size model is fitted on the training images (`train.size_fit`) and saved as
   RUN/model.pt_size.npy (cellpose's `MODEL_size.npy` naming), so `cpsam segment --diameter 0`
   estimates diameters with the fine-tuned model;
6. the fine-tuned model is scored on the same images with the same diameter rule; RUN gets
   `results.csv` (one row per run), `val_report.md`, `overlays/NAME_{before,after}.png` and the
   loop's `metrics.csv` / `curves.png`.

Diameters for scoring: --diameter D for both models when given; otherwise each model's size model
when it has one (cyto_0 does; a fine-tuned classic model gets one in step 5), else the model's own
diameter (a classic model fine-tuned with rescaling keeps the mean training diameter, as cellpose).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cpsam import io, pairing
from cpsam.metrics import score_image
from cpsam.models import ModelSpecError, load_model, resolve_model
from cpsam.models.cellpose_sam import CellposeSAM
from cpsam.pairing import read_label_file
from cpsam.segment import Segmenter
from cpsam.transforms import channels_ignored, scaled_shape, select_channels, to_channels_last
from data_prep.canonical import (
    CanonicalDataset,
    IndexRow,
    image_path,
    mask_path,
    read_index,
    write_example,
    write_index,
)
from train.augment import AugmentConfig
from train.config import ConfigError, TrainConfig, apply_overrides, preset
from train.data import check_example
from train.degrade import DegradeConfig
from train.loop import train
from train.run_folder import claim_run_folder
from train.schedule import ScheduleConfig
from train.size_fit import fit_size_model

MIN_IMAGES = 2  # one to train on, one to validate
MIN_DIAMETER, MAX_DIAMETER = 1.0, 10_000.0  # pixels: the scoring diameters --diameter may give
THRESHOLDS = (0.5, 0.75, 0.9)
RESULT_COLUMNS = (
    "run", "base_model", "model_kind", "n_train", "n_val", "epochs", "lr", "weight_decay", "batch_size",
    "steps", "seconds", "diameter", "seed",
    "ap50_before", "ap75_before", "ap90_before", "err50_before",
    "ap50_after", "ap75_after", "ap90_after", "err50_after",
)


class FinetuneError(RuntimeError):
    """A fine-tuning request that cannot run (too few labels, unreadable model, ...); one clear line."""


class FinetuneDataError(FinetuneError):
    """The labelled images given cannot train a model (none usable, no validation image left); a data error."""


@dataclass(frozen=True)
class LabelledImage:
    """An image file and its label source: a label image file, a `_seg.npy`, or a canonical example."""

    name: str
    image: Path
    labels: Path
    canonical_index: int | None = None


@dataclass
class Scores:
    """Per-image and mean scores of one model on the validation images."""

    per_image: list[dict[str, float]] = field(default_factory=list)

    def mean(self, key: str) -> float:
        """Mean over images of one column (AP is averaged per image, as cellpose reports it)."""
        values = [row[key] for row in self.per_image]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class FinetuneResult:
    """What `finetune` did: the run folder, the split, both scores and the training time (s)."""

    run: Path
    train_names: list[str]
    val_names: list[str]
    before: Scores
    after: Scores
    seconds: float
    model_path: Path
    size_model_path: Path | None


# --------------------------------------------------------------------------------------------- labels
def looked_for(images: Path, masks: Path | None) -> str:
    """Where labels were looked for, in words (for the 'too few labelled images' message)."""
    where = f"in {masks} (NAME.* or NAME_masks.*)" if masks is not None else (
        f"beside the images in {images} (NAME_masks.*, NAME_cp_masks.*, NAME_mask.*, NAME_labels.*, NAME_seg.npy)")
    return where


def find_labelled_images(images: str | os.PathLike[str], masks: str | os.PathLike[str] | None = None
                         ) -> tuple[list[LabelledImage], list[Path]]:
    """(labelled images sorted by image path, images without labels) in the folder `images`.

    Images and labels pair by `cpsam.pairing` (labels beside the images, or in `masks`). A canonical
    dataset folder (with index.csv) yields all of its examples. Raises FinetuneError when the folder does
    not exist or two labelled images share a name (NAME_img.tif and NAME.png are both 'NAME').
    """
    root = Path(images)
    if not root.is_dir():
        raise FinetuneError(f"--images {root}: no such folder")
    if (root / "index.csv").is_file() and (root / "images").is_dir():
        ds = CanonicalDataset(root)
        return [LabelledImage(row.name, image_path(root, row.name), mask_path(root, row.name), i)
                for i, row in enumerate(ds)], []
    masks_dir = Path(masks) if masks is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise FinetuneError(f"--masks {masks_dir}: no such folder")
    folder = pairing.pair_folder(root, masks_dir)
    found, seen = [], {}
    for image, label in folder.pairs:
        name = image.stem[: -len("_img")] if image.stem.endswith("_img") else image.stem
        if name in seen:
            raise FinetuneError(f"{image} and {seen[name]} have the same name {name!r}; rename one")
        seen[name] = image
        found.append(LabelledImage(name, image, label))
    for image, _ in folder.contested:  # another image took its label file: one of the same name, or unlabelled
        name = image.stem[: -len("_img")] if image.stem.endswith("_img") else image.stem
        if name in seen:
            first, second = sorted((image, seen[name]))
            raise FinetuneError(f"{second} and {first} have the same name {name!r}; rename one")
    unlabelled = sorted(folder.unlabelled + [image for image, _ in folder.contested])
    return found, unlabelled


def skipped_files(images: str | os.PathLike[str], masks: str | os.PathLike[str] | None = None,
                  unlabelled: Sequence[Path] | None = None) -> str:
    """What pairing the folder `images` skipped, in words ('' when nothing): how many images have no label file
    and how many label files belong to no image (`cpsam.pairing.pair_folder`'s unlabelled and orphans), with the
    first of each. `unlabelled`: the images already known to have none (e.g. `find_labelled_images`' second)."""
    root = Path(images)
    if not root.is_dir() or (root / "index.csv").is_file():
        return ""
    folder = pairing.pair_folder(root, Path(masks) if masks is not None else None)
    alone = sorted(unlabelled) if unlabelled is not None else sorted(folder.unlabelled)
    parts = []
    if alone:
        parts.append(f"{len(alone)} image{'s' if len(alone) != 1 else ''} without labels (e.g. {alone[0]})")
    if folder.orphans:
        parts.append(f"{len(folder.orphans)} label file{'s' if len(folder.orphans) != 1 else ''} of no image "
                     f"(e.g. {sorted(folder.orphans)[0]})")
    return f"skipped {' and '.join(parts)}" if parts else ""


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random split: (train names, val names), each sorted. At least one image in each part
    when val_fraction > 0 (the seed's 80:20 by default)."""
    n = len(names)
    if not 0 <= val_fraction < 1:
        raise FinetuneError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else min(n - 1, max(1, int(round(n * val_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val


# --------------------------------------------------------------------------------------------- models
def load_base_model(spec: str) -> nn.Module:
    """A model as `cpsam segment --model` takes it (pretrained name, model file, run folder), with
    its size model attached when one is stored beside it. Raises FinetuneError with the reason."""
    try:
        return resolve_model(spec, torch.device("cpu"))
    except ModelSpecError as exc:
        raise FinetuneError(f"cannot load the model: {exc}") from exc


def is_classic(model: nn.Module) -> bool:
    """Classic Cellpose (CPnet family) rather than CP-SAM."""
    return not isinstance(model, CellposeSAM)


def finetune_config(model: nn.Module, model_spec: str, run: Path, n_train: int, seed: int,
                    overrides: Sequence[str] = ()) -> TrainConfig:
    """The run config: the preset of the model kind, the run's data, then the user's overrides.

    CP-SAM (cellpose 4 `train_seg` fine-tuning defaults): batch 1, AdamW lr 1e-5 / wd 0.1, 100
    epochs with train_seg's schedule, scale 0.75-1.25, no rescaling, no intensity augmentation.
    Classic (cellpose 3 `train_seg` defaults): batch 8, AdamW lr 0.005 / wd 1e-5, 224-px crops,
    images rescaled so cells are diam_mean wide then scale 0.75-1.25, 100 epochs (cellpose 3's
    retraining length; its 2000 are for training from scratch) with the same schedule.
    Both: an epoch is min(800, max(8, n_train)) samples (cellpose's paper fine-tuning), images with
    at least one object are used (cellpose's GUI retraining uses all labelled images; its
    min_train_masks=5 would drop small crops), validation every 10 epochs.
    """
    diam_mean = float(model.diam_mean.detach().float().cpu()[0])
    if is_classic(model):
        cfg = TrainConfig(batch_size=8)
        cfg.augment = AugmentConfig(scale_mode="range", scale_range=0.5, rescale_to_diam_mean=True,
                                    diam_mean=diam_mean, intensity=False)
        cfg.degrade = DegradeConfig(fraction=0.0)
        cfg.optim.lr, cfg.optim.weight_decay = 0.005, 1e-5
        cfg.schedule = ScheduleConfig(kind="cellpose", epochs=100)
        cfg.model.name = "cpnet"
    else:
        cfg = preset("finetune")
        cfg.augment.diam_mean = diam_mean
        cfg.model.name = str(getattr(model, "model_name", "cpsam_vit_l"))
    cfg.model.init = model_spec
    cfg.output_dir = str(run)
    cfg.seed = int(seed)
    cfg.data.train = [str(run / "data")]
    cfg.data.val = [str(run / "data")]
    cfg.data.min_train_masks = 1
    cfg.schedule.samples_per_epoch = min(800, max(8, n_train))
    cfg.val.every_epochs = 10
    cfg.checkpoint.every_steps = 100
    return apply_user_overrides(cfg, overrides)


def apply_user_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`cfg` with the user's key=value overrides applied; a bad one is a FinetuneError naming it (the rule of every
    workflow that builds a config for the user: finetune, binary train / distill)."""
    try:
        return apply_overrides(cfg, list(overrides))
    except ConfigError as exc:
        raise FinetuneError(f"bad key=value override: {exc}") from exc


# --------------------------------------------------------------------------------------------- data
def build_dataset(run: Path, items: Sequence[LabelledImage], n_channels: int, channels: Sequence[int] | None,
                  progress: bool = True) -> tuple[list[IndexRow], list[str]]:
    """Write RUN/data (canonical: images in the model's `n_channels` input channels, `channels` applied), every
    example in split "train" (the split is made later, among the usable ones: `split_usable`); examples written
    by an earlier run of the same request are kept. Returns (rows written, 'FILE: problem' of those left out)."""
    root = run / "data"
    rows, problems = [], []
    existing = {r.name: r for r in read_index(root)}
    sources: dict[Path, CanonicalDataset] = {}  # canonical inputs: one index read per source folder
    ignored_for: list[Path] = []  # single-channel images `channels` cannot apply to (used as they are)
    for item in tqdm(items, desc="prepare data", disable=not progress, leave=False):
        if item.name in existing and (root / "masks" / f"{item.name}.tif").is_file():
            rows.append(existing[item.name])
            continue
        try:
            if item.canonical_index is not None:
                folder = item.image.parent.parent
                if folder not in sources:
                    sources[folder] = CanonicalDataset(folder)
                ds = sources[folder]
                image, labels = ds.image(item.canonical_index), ds.mask(item.canonical_index)
                hwc = to_channels_last(image, 0 if image.ndim == 3 else None)
            else:
                image, labels = io.read_image(item.image), read_label_file(item.labels)
                hwc = to_channels_last(image)
            ignored = channels_ignored(hwc.shape[-1], channels)
            if ignored:
                ignored_for.append(item.image)
            picked = select_channels(hwc, channels, n_channels)  # (H, W, n_channels), zero-filled
            rows.append(write_example(root, item.name, picked.transpose(2, 0, 1), labels, dataset="finetune",
                                      split="train", license="yours", source=str(item.image)))
        except (io.InputFileError, ValueError) as exc:
            problems.append(f"{item.image}: {exc}")
    if ignored_for:
        print(f"cpsam finetune: {channels_ignored(1, channels)} ({len(ignored_for)} single-channel "
              f"image{'s' if len(ignored_for) != 1 else ''}, e.g. {ignored_for[0]})", file=sys.stderr)
    write_index(root, rows)
    return rows, problems


def drop_unusable(root: Path, rows: Sequence[IndexRow], check_pixels: bool = True) -> tuple[list[IndexRow], list[str]]:
    """(the rows training can use, 'FILE: problem' of the others) by the loop's own rule (`train.data.check_example`:
    a mask with objects, shapes that agree, finite pixels); the others are removed from `root`'s index.csv."""
    kept, problems = [], []
    for row in rows:
        reason = check_example(root, row, check_pixels=check_pixels)
        if reason is None:
            kept.append(row)
        else:
            problems.append(f"{row.source}: {reason}")
    if len(kept) != len(rows):
        write_index(root, kept)
    return kept, problems


def split_usable(run: Path, rows: Sequence[IndexRow], val_fraction: float, seed: int,
                 option: str = "--val-fraction") -> tuple[list[str], list[str]]:
    """Split the usable examples of RUN/data (`split_names`), write the split into its index.csv and into
    RUN/train.txt / RUN/val.txt (only the names used); returns (train names, val names). Raises FinetuneDataError
    when fewer than MIN_IMAGES are usable with a validation fraction > 0 (an empty validation set would score
    nothing) or none at all."""
    names = sorted(r.name for r in rows)
    if not names:
        raise FinetuneDataError(f"no usable labelled image left in {run / 'data'} (each was left out, see above)")
    if val_fraction > 0 and len(names) < MIN_IMAGES:
        raise FinetuneDataError(
            f"only {len(names)} usable labelled image ({names[0]}) after leaving out the unusable ones; need at least "
            f"{MIN_IMAGES} (one to train on, one to validate), or {option} 0")
    train_names, val_names = split_names(names, val_fraction, seed)
    chosen = set(train_names)
    write_index(run / "data", [replace(r, split="train" if r.name in chosen else "val") for r in rows])
    for fname, part in (("train.txt", train_names), ("val.txt", val_names)):
        with io.atomic_path(run / fname) as tmp:
            Path(tmp).write_text("".join(f"{n}\n" for n in part))
    return train_names, val_names


def check_diameter(diameter: float | None, diam_mean: float, shapes: Sequence[tuple[int, int]] = ()) -> None:
    """Refuse (FinetuneError naming --diameter) a scoring diameter that is not 0 or within [MIN_DIAMETER,
    MAX_DIAMETER] pixels, or that would rescale one of the images (H, W) `shapes` to nothing or past
    `cpsam.transforms.scaled_shape`'s pixel limit (what `cpsam segment` refuses)."""
    if diameter is None or diameter == 0:
        return
    if not (math.isfinite(diameter) and MIN_DIAMETER <= diameter <= MAX_DIAMETER):
        raise FinetuneError(f"--diameter must be 0 (estimate) or a cell diameter from {MIN_DIAMETER:g} to "
                            f"{MAX_DIAMETER:g} pixels, got {diameter:g}")
    for height, width in shapes:
        try:
            scaled_shape(height, width, diam_mean / diameter)
        except ValueError as exc:
            raise FinetuneError(f"--diameter {diameter:g}: {exc}") from exc


def score_model(model: nn.Module, run: Path, names: Sequence[str], diameter: float | None, *, label: str,
                progress: bool = True, overlay_dir: Path | None = None, overlay_count: int = 4) -> Scores:
    """Segment the validation examples of RUN/data with `model` and score them (AP, error rate)."""
    ds = CanonicalDataset(run / "data")
    index = {row.name: i for i, row in enumerate(ds)}
    segmenter = Segmenter(model, device="cpu" if not torch.cuda.is_available() else "cuda")
    scores = Scores()
    for k, name in enumerate(tqdm(list(names), desc=f"score {label}", disable=not progress, leave=False)):
        i = index[name]
        image, truth = ds.image(i), ds.mask(i)
        result = segmenter.segment([image], diameter=diameter, channel_axis=0 if image.ndim == 3 else None)[0]
        s = score_image(truth, result.masks, thresholds=THRESHOLDS)
        scores.per_image.append({
            "name": name, "n_true": s.n_true, "n_pred": s.n_pred, "diameter": result.diameter,
            "diameter_source": result.diameter_source,
            **{f"ap{int(t * 100)}": s.at(t).ap for t in THRESHOLDS}, "err50": s.at(0.5).error_rate,
        })
        if overlay_dir is not None and k < overlay_count:
            overlay_dir.mkdir(parents=True, exist_ok=True)
            io.write_png(overlay_dir / f"{name}_{label}.png",
                         io.outline_overlay(image, result.masks, channel_axis=0 if image.ndim == 3 else None))
    return scores


# --------------------------------------------------------------------------------------------- reports
# what makes two results rows the same run (the rest: its wall time and scores, which a rerun measures again)
_SAME_RUN = tuple(c for c in RESULT_COLUMNS if c != "seconds" and not c.endswith(("_before", "_after")))


def append_results(run: Path, row: dict) -> Path:
    """Add one row to RUN/results.csv (header written when the file is new), atomically. A row of the same run
    (same `_SAME_RUN` columns: a rerun of a finished or resumed run) is replaced, so each run has one row."""
    path = run / "results.csv"
    new = {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in row.items() if k in RESULT_COLUMNS}
    old: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="") as fh:
            old = [r for r in csv.DictReader(fh) if any(r.get(c) != new.get(c, "") for c in _SAME_RUN)]
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows([*old, new])
    return path


def write_report(run: Path, base: str, cfg: TrainConfig, result: FinetuneResult, diameter: float | None,
                 problems: Sequence[str]) -> Path:
    """RUN/val_report.md: the split, the training parameters and the before/after table per image."""
    kind = "classic Cellpose (cellpose 3 defaults)" if cfg.model.name == "cpnet" else "CP-SAM (cellpose 4 defaults)"
    lines = [f"# Fine-tuning report: {base} -> {result.model_path}", "",
             f"- training images: {len(result.train_names)} ({', '.join(result.train_names)})",
             f"- validation images: {len(result.val_names)} ({', '.join(result.val_names)})",
             f"- preset: {kind};"
             f" batch {cfg.batch_size}, AdamW lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
             f"{cfg.schedule.epochs} epochs of {cfg.schedule.samples_per_epoch} samples, seed {cfg.seed}",
             f"- diameter for scoring: {diameter if diameter else 'estimated (size model) or the model own'}",
             f"- wall time: {result.seconds:.0f} s", ""]
    if problems:
        lines += ["Left out (unreadable):", *[f"- {p}" for p in problems], ""]
    lines += ["| image | cells | diameter before / after (px) | AP@0.5 before | after | AP@0.75 before | after |"
              " AP@0.9 before | after |", "|---|---|---|---|---|---|---|---|---|"]
    for b, a in zip(result.before.per_image, result.after.per_image, strict=True):
        lines.append(f"| {b['name']} | {b['n_true']} | {b['diameter']:.1f} ({b['diameter_source']}) / "
                     f"{a['diameter']:.1f} ({a['diameter_source']}) | {b['ap50']:.3f} | {a['ap50']:.3f} | "
                     f"{b['ap75']:.3f} | {a['ap75']:.3f} | {b['ap90']:.3f} | {a['ap90']:.3f} |")
    m = lambda s, k: s.mean(k)  # noqa: E731
    lines += [f"| **mean** | | | **{m(result.before, 'ap50'):.3f}** | **{m(result.after, 'ap50'):.3f}** | "
              f"{m(result.before, 'ap75'):.3f} | {m(result.after, 'ap75'):.3f} | {m(result.before, 'ap90'):.3f} | "
              f"{m(result.after, 'ap90'):.3f} |", "",
              f"Error rate at 0.5: {m(result.before, 'err50'):.3f} before, {m(result.after, 'err50'):.3f} after.",
              "Overlays (red outlines): overlays/NAME_before.png, overlays/NAME_after.png. "
              "Training curves: curves.png.",
              ""]
    path = run / "val_report.md"
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------- main
def finetune(model: str, images: str | os.PathLike[str], out: str | os.PathLike[str], *,
             masks: str | os.PathLike[str] | None = None, val_fraction: float = 0.2, diameter: float | None = None,
             channels: Sequence[int] | None = None, seed: int = 0, overrides: Sequence[str] = (),
             size_epochs: int = 10, progress: bool = True) -> FinetuneResult:
    """Run the whole workflow (module docstring) and return what it measured. Raises FinetuneError
    (too few labelled images, bad model, bad override) and train.loop.TrainingError."""
    start = time.perf_counter()
    run = Path(out)
    if diameter is not None and not (math.isfinite(diameter) and diameter >= 0):
        raise FinetuneError(f"--diameter must be a positive number of pixels (0 = estimate), got {diameter}")
    check_diameter(diameter, 1.0)
    diameter = diameter or None
    if not 0 <= val_fraction < 1:
        raise FinetuneError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    items, unlabelled = find_labelled_images(images, masks)
    if len(items) < MIN_IMAGES:
        raise FinetuneError(
            f"found {len(items)} labelled image{'s' if len(items) != 1 else ''} (and {len(unlabelled)} without labels) "
            f"{looked_for(Path(images), None if masks is None else Path(masks))}; need at least {MIN_IMAGES} "
            "(one to train on, one to validate)")
    skipped = skipped_files(images, masks, unlabelled)
    if skipped:
        print(f"cpsam finetune: {skipped}", file=sys.stderr)
    base = load_base_model(model)
    finetune_config(base, model, run, len(items), seed, overrides)  # a bad override is refused before any write
    claim_run_folder(run, "finetune", {
        "model": Path(model) if Path(model).exists() else model, "images": Path(images),
        "masks": None if masks is None else Path(masks), "val_fraction": val_fraction, "seed": seed,
        "channels": None if channels is None else list(channels)})
    rows, problems = build_dataset(run, items, int(base.in_channels), channels, progress)
    rows, unusable = drop_unusable(run / "data", rows)
    problems += unusable
    for p in problems:
        print(f"cpsam finetune: left out {p}", file=sys.stderr)
    check_diameter(diameter, float(base.diam_mean.detach().float().cpu()[0]), [(r.height, r.width) for r in rows])
    train_names, val_names = split_usable(run, rows, val_fraction, seed)
    print(f"cpsam finetune: {len(train_names)} training and {len(val_names)} validation images "
          f"(split with seed {seed}: {run / 'train.txt'}, {run / 'val.txt'})", file=sys.stderr)
    cfg = finetune_config(base, model, run, len(train_names), seed, overrides)
    before = score_model(base, run, val_names, diameter, label="before", progress=progress,
                         overlay_dir=run / "overlays") if val_names else Scores()
    del base
    # a stop signal raises train.loop.RunStopped here, a final checkpoint it could not write (a full disk)
    # TrainingError: nothing below runs without this run's model.pt
    train(cfg)
    tuned = load_model(run / "model.pt")
    size_path = None
    if is_classic(tuned):
        ds = CanonicalDataset(run / "data", split="train")
        report = fit_size_model(tuned, [ds.image(i) for i in range(len(ds))], [ds.mask(i) for i in range(len(ds))],
                                n_epochs=size_epochs, seed=seed, progress=progress)
        size_path = report.size_model.save(run / "model.pt_size.npy")
        tuned.size_model = report.size_model
        print(f"cpsam finetune: size model fitted on {report.n_samples} crops (train correlation "
              f"{report.train_correlation:.3f}) -> {size_path}", file=sys.stderr)
    after = score_model(tuned, run, val_names, diameter, label="after", progress=progress,
                        overlay_dir=run / "overlays") if val_names else Scores()
    seconds = time.perf_counter() - start
    result = FinetuneResult(run, train_names, val_names, before, after, seconds, run / "model.pt", size_path)
    steps = cfg.schedule.epochs * math.ceil(cfg.schedule.samples_per_epoch / cfg.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    append_results(run, {
        "run": str(run), "base_model": model, "model_kind": "classic" if cfg.model.name == "cpnet" else "cpsam",
        "n_train": len(train_names), "n_val": len(val_names), "epochs": cfg.schedule.epochs, "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay, "batch_size": cfg.batch_size, "steps": steps,
        "seconds": round(seconds, 1), "diameter": diameter if diameter else "auto", "seed": seed,
        **{f"{k}_before": before.mean(k) for k in ("ap50", "ap75", "ap90", "err50")},
        **{f"{k}_after": after.mean(k) for k in ("ap50", "ap75", "ap90", "err50")},
    })
    write_report(run, model, cfg, result, diameter, problems)
    return result
