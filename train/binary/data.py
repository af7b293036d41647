"""Cell / background training data: the layouts users keep it in -> canonical datasets (instance masks).

Layouts read directly (`find_binary_data`):

- a canonical dataset folder (index.csv): used in place when it has both train and val rows (instance masks
  are binarized when samples are made), else copied with a seeded split;
- the first seed's root: `FullImage/` (images), `Mask_Norm/` (class maps, 0 = background; the same file
  names, or NAME_masks.*), `codes.txt` (one class name per line; every class but the first is "cell");
- the second seed's root: `TRAIN_IMG_DIR/0/`, `TRAIN_LABEL_DIR/0/`, `VALID_IMG_DIR/0/`, `VALID_LABEL_DIR/0/`
  (the `0/` class subfolder of Keras' flow_from_directory is optional); its split is kept;
- plain folders: `--images DIR --masks DIR` (NAME.* or NAME_masks.* in DIR), or NAME_masks.* (and the other
  label names `cpsam finetune` knows) beside the images.

Label images that are class maps (0/1, 0/255, an RGB 0/255 mask, or any image with one non-zero value) become
instance labels by connected components (4-neighbourhood); label images with several ids are kept as
instances. Images are copied with all their channels (loading codes pick channels per sample).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cpsam import io
from data_prep.canonical import INDEX_NAME, IndexRow, read_index, to_chw, write_example, write_index
from data_prep.labels import split_components
from train.finetune import (
    FinetuneDataError,
    FinetuneError,
    LabelledImage,
    drop_unusable,
    find_labelled_images,
    read_label_file,
    skipped_files,
    split_names,
)

SEED1_DIRS = ("FullImage", "Mask_Norm")
SEED2_DIRS = ("TRAIN_IMG_DIR", "TRAIN_LABEL_DIR", "VALID_IMG_DIR", "VALID_LABEL_DIR")


@dataclass
class BinaryData:
    """Where training reads from: canonical roots, the splits, how many source channels the images have."""

    train_roots: list[Path]
    val_roots: list[Path]
    train_split: str | None = "train"
    val_split: str | None = "val"
    layout: str = "canonical"
    n_train: int = 0
    n_val: int = 0
    source_channels: int = 1
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # `skipped_files` of each image/label folder pair, in words


def _class_subfolder(folder: Path) -> Path:
    """`folder/0` when the Keras class subfolder is there, else `folder`."""
    return folder / "0" if (folder / "0").is_dir() else folder


def detect_layout(images: Path, masks: Path | None = None) -> str:
    """"canonical", "fullimage" (FullImage/Mask_Norm/codes.txt), "train_valid_dirs" (TRAIN_IMG_DIR/0, ...)
    or "folders" (plain image and label folders)."""
    if masks is None and (images / INDEX_NAME).is_file() and (images / "images").is_dir():
        return "canonical"
    if masks is None and all((images / d).is_dir() for d in SEED1_DIRS):
        return "fullimage"
    if masks is None and all((images / d).is_dir() for d in SEED2_DIRS):
        return "train_valid_dirs"
    return "folders"


def read_codes(root: Path) -> list[str]:
    """Class names of a FullImage root's codes.txt (one per line or whitespace-separated); [] when absent."""
    path = root / "codes.txt"
    return path.read_text().split() if path.is_file() else []


def read_binary_labels(path: Path, class_map: bool = False) -> np.ndarray:
    """(H, W) instance labels (uint16/uint32, 0 = background) of a label file.

    A class map (`class_map`, or a file with a single non-zero value, or an RGB(A) 0/255 mask) becomes one
    instance per connected foreground component; a file with several ids is taken as instance labels.
    Raises cpsam.io.InputFileError naming the file when it is no label image.
    """
    raw = read_label_file(path) if path.name.endswith("_seg.npy") else io.squeeze_to_2d(io.read_image(path))
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # an RGB(A) mask painted white on black
        raw = (raw[..., :3] > 0).any(axis=-1).astype(np.uint8)
        class_map = True
    if raw.ndim != 2:
        raise io.InputFileError(path, f"label image must be 2-D (or an RGB mask), got shape {raw.shape}")
    labels = io.read_labels(path) if raw.dtype.kind == "f" else raw
    if labels.dtype.kind not in "iub":
        raise io.InputFileError(path, f"label image must hold integer classes or ids, got {labels.dtype}")
    values = np.unique(labels)
    if class_map or np.count_nonzero(values) <= 1:
        return split_components(labels > 0)
    return split_components(labels)  # instances: ids kept apart, a painted-twice id split into its parts


def _pairs(layout: str, images: Path, masks: Path | None) -> list[tuple[LabelledImage, str | None]]:
    """(labelled image, fixed split or None) for the non-canonical layouts."""
    if layout == "fullimage":
        return [(item, None) for item in find_labelled_images(images / "FullImage", images / "Mask_Norm")[0]]
    if layout == "train_valid_dirs":
        out = []
        for img_dir, lab_dir, split in (("TRAIN_IMG_DIR", "TRAIN_LABEL_DIR", "train"),
                                        ("VALID_IMG_DIR", "VALID_LABEL_DIR", "val")):
            found, _ = find_labelled_images(_class_subfolder(images / img_dir), _class_subfolder(images / lab_dir))
            out += [(item, split) for item in found]
        return out
    return [(item, None) for item in find_labelled_images(images, masks)[0]]


def _folder_pairs(layout: str, images: Path, masks: Path | None) -> list[tuple[Path, Path | None]]:
    """The (image folder, label folder or None) pairs that layout `layout` reads its labelled images from."""
    if layout == "fullimage":
        return [(images / "FullImage", images / "Mask_Norm")]
    if layout == "train_valid_dirs":
        return [(_class_subfolder(images / i), _class_subfolder(images / m))
                for i, m in (("TRAIN_IMG_DIR", "TRAIN_LABEL_DIR"), ("VALID_IMG_DIR", "VALID_LABEL_DIR"))]
    return [(images, masks)]


def build_binary_dataset(root: Path, pairs: list[tuple[LabelledImage, str]], class_map: bool, dataset: str,
                         progress: bool = True) -> tuple[list[IndexRow], list[str]]:
    """Write canonical dataset `root` from (labelled image, split) pairs: the image with all its channels, the
    labels as instances (`read_binary_labels`). Examples already written are kept (with the split given).
    Returns (rows written, 'FILE: problem' of the pairs left out)."""
    existing = {r.name: r for r in read_index(root)}
    rows, problems = [], []
    for item, split in tqdm(pairs, desc="prepare data", disable=not progress, leave=False):
        old = existing.get(item.name)
        if old is not None and (root / "masks" / f"{item.name}.tif").is_file():
            rows.append(replace(old, split=split))
            continue
        try:
            image = to_chw(io.read_image(item.image), path=item.image)
            labels = read_binary_labels(item.labels, class_map)
            if not labels.any():
                raise io.InputFileError(item.labels, "no foreground pixel (a training image needs cells)")
            rows.append(write_example(root, item.name, image, labels, dataset=dataset, split=split, license="yours",
                                      source=str(item.image)))
        except (io.InputFileError, ValueError) as exc:
            problems.append(f"{item.image}: {exc}")
    write_index(root, rows)
    return rows, problems


def _canonical_has_splits(root: Path) -> bool:
    splits = {r.split for r in read_index(root)}
    return {"train", "val"} <= splits


@dataclass
class BinarySource:
    """What `find_binary_data` found (nothing written yet): the layout and its labelled images with their fixed
    split (None: split later), or `in_place` for a canonical dataset with train and val rows."""

    src: Path
    masks: Path | None
    layout: str
    pairs: list[tuple[LabelledImage, str | None]]
    in_place: bool = False


def find_binary_data(images: str | os.PathLike[str], masks: str | os.PathLike[str] | None) -> BinarySource:
    """Find the labelled images in any layout (module docstring) without writing anything. Raises FinetuneError
    when the folder is missing or holds fewer than two labelled images."""
    src = Path(images)
    if not src.is_dir():
        raise FinetuneError(f"--images {src}: no such folder")
    mask_dir = Path(masks) if masks is not None else None
    layout = detect_layout(src, mask_dir)
    if layout == "canonical" and _canonical_has_splits(src):
        return BinarySource(src, mask_dir, layout, [], in_place=True)
    if layout == "canonical":
        found, _ = find_labelled_images(src)
        pairs: list[tuple[LabelledImage, str | None]] = [(item, None) for item in found]
    else:
        pairs = _pairs(layout, src, mask_dir)
    if len(pairs) < 2:
        raise FinetuneError(f"found {len(pairs)} labelled image(s) in {src} ({layout} layout); need at least 2 "
                            "(one to train on, one to validate)")
    return BinarySource(src, mask_dir, layout, pairs)


def prepare_binary_data(images: str | os.PathLike[str] | BinarySource, masks: str | os.PathLike[str] | None,
                        run: Path, *, val_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> BinaryData:
    """Make the run's canonical data from the labelled images `find_binary_data` finds in `images` (or from what
    it found: a BinarySource, then `masks` is unused).

    Writes RUN/data (and RUN/train.txt, RUN/val.txt) unless the input is a canonical dataset with train and val
    rows, which is used in place. Raises FinetuneError when fewer than two labelled images are usable.
    """
    found_data = images if isinstance(images, BinarySource) else find_binary_data(images, masks)
    src, mask_dir, layout, pairs = found_data.src, found_data.masks, found_data.layout, found_data.pairs
    if found_data.in_place:
        rows = read_index(src)
        return BinaryData([src], [src], layout=layout, n_train=sum(r.split == "train" for r in rows),
                          n_val=sum(r.split == "val" for r in rows), source_channels=max(r.channels for r in rows))
    skipped = [s for folder, labels in _folder_pairs(layout, src, mask_dir) if (s := skipped_files(folder, labels))]
    codes = read_codes(src) if layout == "fullimage" else []
    if len(codes) > 2:
        print(f"cpsam binary: {src / 'codes.txt'} names {len(codes)} classes; every class but {codes[0]!r} counts "
              "as cell", file=sys.stderr)
    root = run / "data"
    fixed = {item.name: split for item, split in pairs if split is not None}
    # every example first goes in as "train"; the split is made among the usable ones (or kept, when fixed)
    rows, problems = build_binary_dataset(root, [(item, split or "train") for item, split in pairs],
                                          layout == "fullimage", "binary", progress)
    rows, unusable = drop_unusable(root, rows)
    problems += unusable
    free = [r for r in rows if r.name not in fixed]
    if free and val_fraction > 0 and len(free) < 2 and "val" not in fixed.values():
        raise FinetuneDataError(
            f"only {len(free)} usable labelled image in {src} after leaving out the unusable ones"
            + (f" ({problems[0]})" if problems else "") + "; need at least 2 (one to train on, one to validate)")
    chosen = set(split_names([r.name for r in free], val_fraction, seed)[0] if free else [])
    rows = [replace(r, split=fixed.get(r.name) or ("train" if r.name in chosen else "val")) for r in rows]
    write_index(root, rows)
    for fname, split in (("train.txt", "train"), ("val.txt", "val")):
        with io.atomic_path(run / fname) as tmp:
            Path(tmp).write_text("".join(f"{r.name}\n" for r in sorted(rows, key=lambda r: r.name) if r.split == split))
    n_train, n_val = sum(r.split == "train" for r in rows), sum(r.split == "val" for r in rows)
    if n_train == 0:
        raise FinetuneDataError(f"no usable training image left in {src}" + (f" ({problems[0]})" if problems else ""))
    if n_val == 0 and ((val_fraction > 0 and free) or "val" in fixed.values()):
        raise FinetuneDataError(f"no usable validation image left in {src}" + (f" ({problems[0]})" if problems else "")
                                + "; validation would score nothing")
    return BinaryData([root], [root] if n_val else [], layout=layout, n_train=n_train, n_val=n_val,
                      source_channels=max(r.channels for r in rows), problems=problems, skipped=skipped)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image of a folder (or of a canonical dataset's images/), sorted by name; label files beside them
    (NAME_masks.*, ...) are not images. Raises FinetuneError when the folder does not exist."""
    root = Path(folder)
    if (root / INDEX_NAME).is_file() and (root / "images").is_dir():
        root = root / "images"
    found, unlabelled = find_labelled_images(root)
    return sorted([item.image for item in found] + list(unlabelled), key=lambda p: p.name)


def image_name(path: Path) -> str:
    """The example name of an image file: its stem without a trailing `_img`."""
    return path.stem[: -len("_img")] if path.stem.endswith("_img") else path.stem
