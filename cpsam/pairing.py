"""Which file holds the labels of which image: the one naming rule of prep, finetune, eval and distill.

Label file of an image `NAME.EXT` in the same folder, in order of precedence (the first that exists):

    NAME_masks.*  NAME_cp_masks.*  NAME_mask.*  NAME_labels.*  NAME_label.*     (`LABEL_TAGS`)
    NAME_seg.npy                                                             (the Cellpose GUI's file)

`*` runs over `LABEL_SUFFIXES` in that order, upper or lower case. For an image `NAME_img.EXT` or
`NAME_image.EXT` (`IMAGE_TAGS`) each tag is looked for first after `NAME`, then after the full stem
(`NAME_img_masks.*` is what `cpsam segment` writes for `NAME_img.tif`); a `_seg.npy` first after the
full stem (the Cellpose GUI names it after the image file), then after `NAME`.
With a separate labels folder (`masks_dir`) labels are looked for there only: first a file with the
image's own stem (`NAME_img.*`, any label suffix), then the names above.

A file is a label or output file rather than an image (`is_label_or_output`) when its stem ends with a
label tag or with `_seg`, `_outlines` or `_flows` (cellpose's and `cpsam segment`'s other outputs),
unless it is the image of another label file beside it (`cell_mask.tif` beside `cell_mask_masks.tif`).
A label file belongs to one image: when two images would take the same one (`a.tif` and `a.png`,
`a_img.tif` and `a.tif`), `_img` wins over `_image` over no tag, then the suffix earlier in
`LABEL_SUFFIXES`; the other image is reported as `contested`. A label file passed over for one of higher
precedence is `shadowed`; one that belongs to no image is an orphan. `eval.pairing` orders the label
files of one key by the same precedence (`label_rank`).

Label files are read by `read_label_file`; a `_seg.npy` holds a pickled dict and is read only through
`cpsam.safe_npy`, which refuses anything but numpy data (no code runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpsam.io import IMAGE_SUFFIXES, InputFileError, read_labels
from cpsam.safe_npy import UnsafeOrInvalidNpy, load_npy_dict

LABEL_TAGS: tuple[str, ...] = ("_masks", "_cp_masks", "_mask", "_labels", "_label")  # precedence order
SEG_TAG = "_seg"  # NAME_seg.npy, the Cellpose GUI's pickled dict (labels in its "masks" entry)
SEG_NPY = SEG_TAG + ".npy"
IMAGE_TAGS: tuple[str, ...] = ("_img", "_image")  # NAME_img.tif is the image of NAME_masks.tif
OUTPUT_TAGS: tuple[str, ...] = (SEG_TAG, "_outlines", "_flows")  # outputs that are neither image nor label
LABEL_SUFFIXES: tuple[str, ...] = IMAGE_SUFFIXES  # file types a label image may have, in precedence order

_TAGS_LONGEST_FIRST = tuple(sorted(LABEL_TAGS, key=len, reverse=True))  # _cp_masks before _masks


def label_tag(name: str) -> str | None:
    """The label marker of a file name: a `LABEL_TAGS` entry ending its stem, or `SEG_TAG` for NAME_seg.npy;
    None when there is none or nothing precedes it ('_masks.tif' is no label of anything)."""
    if name.endswith(SEG_NPY) and len(name) > len(SEG_NPY):
        return SEG_TAG
    stem = _stem(name)
    return next((t for t in _TAGS_LONGEST_FIRST if stem.endswith(t) and len(stem) > len(t)), None)


def label_key(name: str) -> tuple[str, str | None]:
    """(key, tag) of a file name: the name without extension, label marker and, after a marker, a trailing
    `_img`/`_image`, so that `a.tif`, `a_masks.tif`, `a_cp_masks.png`, `a_img_masks.tif` and `a_seg.npy`
    all have the key 'a'; tag is None for an unmarked name (whose key is its stem)."""
    tag = label_tag(name)
    stem = _stem(name)
    if tag is None:
        return stem, None
    key = stem[: -len(tag)]
    for image_tag in IMAGE_TAGS:
        if key.endswith(image_tag) and len(key) > len(image_tag):
            return key[: -len(image_tag)], tag
    return key, tag


def is_label_or_output(name: str) -> bool:
    """True when a file name is a label file or another segmentation output (`_seg`, `_outlines`, `_flows`),
    not an image. (`pair_folder` also keeps such a name as an image when another label file is its label.)"""
    return label_tag(name) is not None or _stem(name).endswith(OUTPUT_TAGS)


def image_names(image: Path) -> list[str]:
    """The names an image is known by, most specific last: [NAME, NAME_img] for NAME_img.tif, [NAME] else."""
    stem = image.stem
    for tag in IMAGE_TAGS:
        if stem.endswith(tag) and len(stem) > len(tag):
            return [stem[: -len(tag)], stem]
    return [stem]


def label_candidates(image: Path, masks_dir: Path | None = None) -> list[tuple[str, str]]:
    """(stem, suffix) of the label files of `image` in precedence order (see the module rule); the folder is
    `masks_dir` when given, else the image's own folder."""
    names = image_names(image)
    out = [(image.stem, s) for s in LABEL_SUFFIXES] if masks_dir is not None else []
    for tag in LABEL_TAGS:
        out += [(name + tag, s) for name in names for s in LABEL_SUFFIXES]
    out += [(name + SEG_TAG, ".npy") for name in reversed(names)]
    return out


def label_rank(name: str) -> tuple[int, int, int]:
    """Sort key of label files of one image, first = taken (the order of `label_candidates`): marker in
    LABEL_TAGS order then NAME_seg.npy, NAME_masks before NAME_img_masks (but NAME_img_seg.npy before
    NAME_seg.npy), then suffix in LABEL_SUFFIXES order. An unmarked name (a labels folder's NAME.*) first."""
    tag = label_tag(name)
    suffix = Path(name).suffix.lower()
    suffix_rank = LABEL_SUFFIXES.index(suffix) if suffix in LABEL_SUFFIXES else len(LABEL_SUFFIXES)
    if tag is None:
        return -1, 0, suffix_rank
    stem = _stem(name)[: -len(tag)]
    has_image_tag = any(stem.endswith(t) and len(stem) > len(t) for t in IMAGE_TAGS)
    if tag == SEG_TAG:
        return len(LABEL_TAGS), 0 if has_image_tag else 1, suffix_rank
    return LABEL_TAGS.index(tag), int(has_image_tag), suffix_rank


def images_among_labels(files: Iterable[Path]) -> set[Path]:
    """The label-named files of one folder that are images of another label file there
    (`cell_mask.tif` beside `cell_mask_masks.tif`)."""
    files = list(files)
    stems = {p.stem for p in files}
    image_stems = {im for p in files if label_tag(p.name) and (im := _image_stem_of(p, stems))}
    return {p for p in files if p.stem in image_stems and is_label_or_output(p.name)}


def find_label(image: Path, masks_dir: Path | None = None) -> Path | None:
    """The label file of `image` (module rule), or None when there is none."""
    folder = masks_dir if masks_dir is not None else image.parent
    files = _index(_files(folder))
    return next((files[c] for c in label_candidates(image, masks_dir) if c in files and files[c] != image), None)


@dataclass
class FolderPairs:
    """What `pair_folder` found in one folder; every file that could be an image or a label is in one list."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)  # (image, its label file), by image path
    unlabelled: list[Path] = field(default_factory=list)  # images without a label file
    orphans: list[Path] = field(default_factory=list)  # label files of no image
    shadowed: list[tuple[Path, Path]] = field(default_factory=list)  # (label file, the one taking precedence)
    contested: list[tuple[Path, Path]] = field(default_factory=list)  # (image, label another image took)


def pair_folder(folder: Path, masks_dir: Path | None = None) -> FolderPairs:
    """Images of `folder` (not recursive) and their label files there, or in `masks_dir` when given.

    Files considered: regular files not starting with '.' whose suffix (any case) is in LABEL_SUFFIXES.
    Every such file of `folder` and `masks_dir` lands in one list of the result, except other outputs
    (NAME_outlines.*, NAME_flows.*) in `folder`. With `masks_dir`, label files in `folder` are orphans.
    """
    files = _files(folder)
    also_images = images_among_labels(files)
    images = [p for p in files if not is_label_or_output(p.name) or p in also_images]
    beside = [p for p in files if label_tag(p.name) is not None and p not in also_images]
    labels = beside if masks_dir is None else _files(masks_dir)
    index = _index(labels)
    out = FolderPairs()
    taken: dict[Path, Path] = {}
    lower: dict[Path, Path] = {}  # label file -> the label that takes precedence over it
    for image in sorted(images, key=_image_rank):
        found = [index[c] for c in label_candidates(image, masks_dir) if c in index and index[c] != image]
        if not found:
            out.unlabelled.append(image)
        elif found[0] in taken:
            out.contested.append((image, found[0]))
        else:
            taken[found[0]] = image
            out.pairs.append((image, found[0]))
            for other in found[1:]:
                lower.setdefault(other, found[0])
    out.pairs.sort()
    out.unlabelled.sort()
    out.contested.sort()
    out.shadowed = sorted((p, lower[p]) for p in labels if p not in taken and p in lower)
    out.orphans = sorted(p for p in labels if p not in taken and p not in lower)
    if masks_dir is not None:  # label files beside the images are no labels when a labels folder is given
        out.orphans = sorted(out.orphans + beside)
    return out


def read_seg_npy(path: Path) -> dict:
    """The dict of a Cellpose GUI `NAME_seg.npy`, read through `cpsam.safe_npy` (no code runs), with its
    'masks' entry checked: 2-D, integer, no negative ids. Raises InputFileError naming the file."""
    path = Path(path)
    try:
        data = load_npy_dict(path)
    except (OSError, UnsafeOrInvalidNpy) as exc:
        raise InputFileError(path, f"not a readable Cellpose _seg.npy file ({exc})") from exc
    if "masks" not in data or np.asarray(data["masks"]).ndim != 2:
        raise InputFileError(path, "no 2-D 'masks' entry (not a Cellpose _seg.npy file)")
    masks = np.asarray(data["masks"])
    if not np.issubdtype(masks.dtype, np.integer) or (masks.size and masks.min() < 0):
        raise InputFileError(path, f"'masks' must hold non-negative integer ids, got {masks.dtype}")
    return data


def read_label_file(path: Path) -> np.ndarray:
    """(H, W) integer labels, 0 = background, no negative ids, in the dtype stored: a label image
    (`cpsam.io.read_labels`: TIFF/PNG/NPY...) or the 'masks' of a `NAME_seg.npy` (`read_seg_npy`).
    Raises InputFileError naming the file."""
    path = Path(path)
    if path.name.endswith(SEG_NPY):
        return np.asarray(read_seg_npy(path)["masks"])
    return read_labels(path)


def _stem(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix else name


def _files(folder: Path) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if not e.name.startswith(".") and Path(e.name).suffix.lower() in LABEL_SUFFIXES and e.is_file())


def _index(files: Iterable[Path]) -> dict[tuple[str, str], Path]:
    """{(stem, lower-case suffix): path}; of two names differing only in case, the first sorted one."""
    index: dict[tuple[str, str], Path] = {}
    for p in sorted(files):
        index.setdefault((p.stem, p.suffix.lower()), p)
    return index


def _image_stem_of(label: Path, stems: set[str]) -> str | None:
    """The stem of the image a label file beside it belongs to (BASE_img, BASE_image, BASE), or None."""
    tag = label_tag(label.name) or ""
    base = _stem(label.name)[: -len(tag)]
    return next((base + t for t in (*IMAGE_TAGS, "") if base + t in stems), None)


def _image_rank(image: Path) -> tuple[int, int, str]:
    """Which of several images wanting one label file gets it: _img, then _image, then untagged; then suffix."""
    tag = next((i for i, t in enumerate(IMAGE_TAGS) if image.stem.endswith(t) and len(image.stem) > len(t)),
               len(IMAGE_TAGS))
    suffix = image.suffix.lower()
    return tag, LABEL_SUFFIXES.index(suffix) if suffix in LABEL_SUFFIXES else len(LABEL_SUFFIXES), image.name
