"""Teacher masks as labels: a folder of images WITHOUT masks -> canonical datasets labelled by the teacher.

    result = pseudo_label(teacher, Path("images/"), Path("RUN/data"), val_fraction=0.2, seed=0)
    result.train_roots, result.val_roots                  # canonical dataset folders, one per source folder

Source folders: the images directly inside `images` form one folder (named after it), and every subfolder
(one level; names starting with "_" or "." are passed over, e.g. a `_qc/` of quick-look PNGs) forms another.
Label files beside the images (NAME_masks.tif, ...: what `cpsam finetune` finds) are NOT used: the teacher's
masks are the labels. Each folder is split into train / val by `train.finetune.split_names` (seeded, at least
one validation image when the folder has two or more), so every folder has held-out images.

Every image is segmented once with the teacher (`cpsam.segment.Segmenter`, the path users run), at `diameter`
when given, else the teacher's size-model estimate (cyto_0 has one), else the teacher's own diameter; images
where the teacher finds no cell are left out with a message. Stored images are the teacher's input channels
(`cpsam.transforms.select_channels` with `channels`), so training crops, the teacher and validation all read
the same pixels. `OUT/teacher.json` records what made the labels; a rerun with the same settings reuses every
finished example (resumable), other settings are refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cpsam import io
from cpsam.segment import Segmenter, SegmentResult
from cpsam.transforms import select_channels, to_channels_last
from data_prep.canonical import read_index, write_example, write_index
from distill.teachers import Teacher
from train.finetune import find_labelled_images, split_names

SETTINGS_FILE = "teacher.json"


class PseudoLabelError(RuntimeError):
    """A folder that cannot be labelled as asked (no images, another teacher's labels, ...); one clear line."""


@dataclass(frozen=True)
class SourceImage:
    """One input image: its source folder's name, the example name (stem without `_img`) and its path."""

    folder: str
    name: str
    path: Path


@dataclass
class PseudoLabelResult:
    """Canonical dataset folders written (all, those with training rows, those with validation rows), the
    images left out ('PATH: why') and the number of examples written per split."""

    roots: list[Path] = field(default_factory=list)
    train_roots: list[Path] = field(default_factory=list)
    val_roots: list[Path] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0


def is_canonical(path: Path) -> bool:
    """True for a canonical dataset folder (index.csv and images/)."""
    return (path / "index.csv").is_file() and (path / "images").is_dir()


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def canonical_roots(path: Path) -> list[Path] | None:
    """[path] when it is a canonical dataset, its subfolders when every one of them is, else None."""
    if is_canonical(path):
        return [path]
    subs = _subfolders(path) if path.is_dir() else []
    if subs and all(is_canonical(p) for p in subs):
        return subs
    return None


def _example_name(path: Path) -> str:
    return path.stem[: -len("_img")] if path.stem.endswith("_img") else path.stem


def list_source_images(images: Path) -> dict[str, list[SourceImage]]:
    """{folder name: its images sorted by name} (see the module docstring). Raises PseudoLabelError when there
    is no image at all, or when two images of one folder share an example name."""
    if not images.is_dir():
        raise PseudoLabelError(f"--images {images}: no such folder")
    folders = {images.name or "images": images}
    for sub in _subfolders(images):
        folders.setdefault(sub.name, sub)
    found: dict[str, list[SourceImage]] = {}
    for label, folder in folders.items():
        labelled, unlabelled = find_labelled_images(folder)
        paths = sorted([item.image for item in labelled] + list(unlabelled))
        seen: dict[str, Path] = {}
        for p in paths:
            name = _example_name(p)
            if name in seen:
                raise PseudoLabelError(f"{p} and {seen[name]} have the same name {name!r}; rename one")
            seen[name] = p
        if paths:
            found[label] = [SourceImage(label, _example_name(p), p) for p in paths]
    if not found:
        raise PseudoLabelError(f"--images {images}: no image files ({', '.join(io.IMAGE_SUFFIXES)}) in it or in "
                               "its subfolders")
    return found


def teacher_segmenter(teacher: Teacher, device: torch.device, batch_size: int = 8
                      ) -> Callable[..., SegmentResult]:
    """A function (image (C, H, W) or (H, W), diameter or None, **mask rules) -> SegmentResult with the teacher.

    No diameter: the size model's estimate (for an ensemble: the first member's, alone), else the teacher's own.
    An augmented teacher (`teacher.augment`) segments with flip test-time augmentation (`cpsam segment --augment`).
    """
    segmenter = Segmenter(teacher.net, device=device, batch_size=batch_size, rules=teacher.rules,
                          size_model=teacher.size_model if len(teacher.members) == 1 else None)
    estimator = None
    if len(teacher.members) > 1 and teacher.size_model is not None:
        estimator = Segmenter(teacher.members[0].net, device=device, batch_size=batch_size)

    def run(image: np.ndarray, diameter: float | None, **rules) -> SegmentResult:
        axis = 0 if image.ndim == 3 else None
        if not diameter and estimator is not None:
            diameter = estimator.estimate_diameter(image, channel_axis=axis)[0]
        return segmenter.segment([image], diameter=diameter or None, channel_axis=axis, augment=teacher.augment,
                                 **rules)[0]

    return run


def _settings(teacher: Teacher, diameter: float | None, channels: Sequence[int] | None, seed: int,
              val_fraction: float, rules: dict) -> dict:
    return {"teacher": teacher.specs, "diameter": float(diameter or 0.0),
            "channels": list(channels) if channels is not None else None, "seed": int(seed),
            "val_fraction": float(val_fraction), "rules": {k: rules[k] for k in sorted(rules)}}


def labelling_settings(folder: Path) -> dict | None:
    """The settings that made the teacher's labels in `folder` (its teacher.json: teacher, diameter, channels, seed,
    val_fraction, rules), or None when it holds none (not made by `pseudo_label`, or unreadable)."""
    try:
        return json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PseudoLabelError(f"{path}: unreadable ({exc}); remove {out} to start over") from exc
        if old != settings:
            diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in settings if old.get(k) != settings[k]]
            raise PseudoLabelError(f"{out} holds labels made with other settings ({'; '.join(diff)}); use another "
                                   "--out, or remove that folder")
    out.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))


def pseudo_label(teacher: Teacher, images: Path, out: Path, *, val_fraction: float = 0.2, seed: int = 0,
                 diameter: float | None = None, channels: Sequence[int] | None = None, flow_threshold: float = 0.4,
                 cellprob_threshold: float = 0.0, niter: int | None = None, device: torch.device | None = None,
                 progress: bool = True) -> PseudoLabelResult:
    """Label every image under `images` with the teacher into canonical datasets OUT/<folder> (module docstring).

    diameter: px (None or 0 = estimated / the teacher's own); channels: cellpose-3 [SEG, NUC] or None;
    flow_threshold, cellprob_threshold, niter: the teacher's mask rules (recorded; the student is validated with
    the same). Returns the PseudoLabelResult. Raises PseudoLabelError (no images, other settings in OUT).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rules = {"flow_threshold": float(flow_threshold), "cellprob_threshold": float(cellprob_threshold),
             "niter": niter}
    sources = list_source_images(images)
    _check_settings(out, _settings(teacher, diameter, channels, seed, val_fraction, rules))
    segment = teacher_segmenter(teacher, device)
    result = PseudoLabelResult()
    total = sum(len(v) for v in sources.values())
    bar = tqdm(total=total, desc="teacher labels", unit="image", disable=not progress, file=sys.stderr)
    for folder, items in sources.items():
        root = out / folder
        train_names, _ = split_names([it.name for it in items], val_fraction, seed)
        train_set = set(train_names)
        existing = {r.name: r for r in read_index(root)}
        rows = []
        for item in items:
            split = "train" if item.name in train_set else "val"
            old = existing.get(item.name)
            if old is not None and old.split == split and (root / "masks" / f"{item.name}.tif").is_file():
                rows.append(old)
                bar.update()
                continue
            try:
                hwc = to_channels_last(io.read_image(item.path))
                picked = select_channels(hwc, channels, teacher.in_channels).transpose(2, 0, 1)
                image = picked[0] if picked.shape[0] == 1 else picked
                masks = segment(image, diameter, niter=niter, flow_threshold=flow_threshold,
                                cellprob_threshold=cellprob_threshold).masks
            except (io.InputFileError, ValueError) as exc:
                result.left_out.append(f"{item.path}: {exc}")
                bar.update()
                continue
            if int(masks.max()) == 0:
                result.left_out.append(f"{item.path}: the teacher finds no cell in it")
            else:
                rows.append(write_example(root, item.name, image, masks, dataset=folder, split=split,
                                          license="as the source image", source=str(item.path)))
            bar.update()
        bar.refresh()
        if rows:
            write_index(root, rows)
            result.roots.append(root)
            n_train = sum(r.split == "train" for r in rows)
            result.n_train += n_train
            result.n_val += len(rows) - n_train
            if n_train:
                result.train_roots.append(root)
            if len(rows) > n_train:
                result.val_roots.append(root)
    bar.close()
    for line in result.left_out:
        print(f"cpsam distill: left out {line}", file=sys.stderr)
    if not result.train_roots:
        raise PseudoLabelError(f"the teacher found cells in no training image under {images}")
    return result
