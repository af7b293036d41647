"""Your own data: a plain folder of image/mask pairs, or Cellpose GUI `_seg.npy` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam.io import IMAGE_SUFFIXES, InputFileError, read_image, read_labels
from data_prep.sources.base import Example, Item, Source, rel, safe_name

_MASK_TAGS = ("_masks", "_mask", "_labels", "_label")
_IMG_TAGS = ("_img", "_image", "")
_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


def _split_of(path: Path, raw: Path, default: str) -> str:
    for part in Path(rel(path, raw)).parts[:-1]:
        if part.lower() in _SPLIT_DIRS:
            return _SPLIT_DIRS[part.lower()]
    return default


class Folder(Source):
    name = "folder"
    title = "a plain folder of image/mask pairs (any microscope, your own annotations)"
    license = "yours"
    size = "-"
    manual = "  Nothing to download: point --raw at your folder."
    layout = """
    NAME_img.tif + NAME_masks.tif, or NAME.tif + NAME_masks.tif (Cellpose convention; also _mask,
    _labels, _label; any of .tif .tiff .png .npy ...), searched recursively;
    or images/NAME.ext + masks/NAME.ext.
    Masks: 2-D integer instance ids, 0 = background. A sub-folder named train/val/test sets the split,
    otherwise --split (default train).
    """
    channel_names = "as stored"

    def __init__(self, split: str = "train") -> None:
        self.split = split

    def items(self, raw: Path) -> list[Item]:
        """Image/mask pairs; every image without a mask and every mask without an image becomes an
        item whose `load` raises InputFileError naming the file (listed and counted, never fatal)."""
        files = sorted(
            p
            for p in raw.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.name.startswith(".")
            and not p.name.endswith("_seg.npy")
            and not p.stem.endswith("_flows")
        )
        by_stem = {(p.parent, p.stem): p for p in files}
        tagged = {p: _image_of(p, by_stem) for p in files if _mask_tag(p.stem) is not None}
        # a tagged name that is the image of another mask is an image (cell_mask.tif + cell_mask_masks.tif)
        images_of_masks = {img for img in tagged.values() if img is not None}
        masks = {m: img for m, img in tagged.items() if m not in images_of_masks}
        pairs: list[tuple[Path, Path]] = []
        orphans: list[tuple[Path, str]] = []
        for m, img in masks.items():
            if img is None:
                base = m.stem[: -len(_mask_tag(m.stem) or "")]
                orphans.append((m, f"mask without an image beside it (looked for {base}{{_img,_image,}}.*)"))
            else:
                pairs.append((img, m))
        used = {p for pair in pairs for p in pair} | {m for m, _ in orphans}
        for mask_dir in sorted(d for d in raw.rglob("masks") if d.is_dir()):
            for m in sorted(q for q in mask_dir.iterdir() if q in set(files) - used):
                img = by_stem.get((mask_dir.parent / "images", m.stem))
                if img is None:
                    orphans.append((m, f"mask without an image (looked for {mask_dir.parent / 'images' / m.stem}.*)"))
                else:
                    pairs.append((img, m))
                used |= {m} if img is None else {img, m}
        for p in files:
            if p not in used:
                orphans.append((p, "image without a mask (looked for NAME_masks.*, _mask, _labels, _label, "
                                   "or masks/NAME.* beside images/)"))
        items = [self._pair_item(raw, img, m) for img, m in pairs]
        items += [Item(name=f"{rel(p, raw)}#unpaired", split=_split_of(p, raw, self.split),
                       ref=(rel(p, raw), problem), source=rel(p, raw)) for p, problem in sorted(orphans)]
        return items

    def _pair_item(self, raw: Path, img: Path, m: Path) -> Item:
        stem = img.stem[: -len("_img")] if img.stem.endswith("_img") else img.stem
        name = safe_name(Path(rel(img.with_name(stem), raw)).as_posix().replace("/images/", "/"))
        return Item(name=name, split=_split_of(img, raw, self.split), ref=(rel(img, raw), rel(m, raw)),
                    source=rel(img, raw))

    def load(self, raw: Path, item: Item) -> Example:
        if item.name.endswith("#unpaired"):  # ref = (file, problem), see `items`
            raise InputFileError(raw / item.ref[0], item.ref[1])
        return Example(read_image(raw / item.ref[0]), read_labels(raw / item.ref[1]))


def _mask_tag(stem: str) -> str | None:
    """The mask marker a file stem ends with (_masks, _mask, _labels, _label), or None."""
    return next((t for t in _MASK_TAGS if stem.endswith(t)), None)


def _image_of(mask: Path, by_stem: dict[tuple[Path, str], Path]) -> Path | None:
    """The image beside a tagged mask file (BASE_img.*, BASE_image.*, BASE.*), or None."""
    base = mask.stem[: -len(_mask_tag(mask.stem) or "")]
    return next((by_stem[(mask.parent, base + t)] for t in _IMG_TAGS if (mask.parent, base + t) in by_stem), None)


class SegNpy(Source):
    name = "seg_npy"
    title = "Cellpose GUI annotations (NAME_seg.npy next to NAME.tif/png/...)"
    license = "yours"
    size = "-"
    manual = "  Nothing to download: point --raw at the folder you annotated in the Cellpose GUI."
    layout = """
    NAME_seg.npy (a pickled dict with "masks"; "img" used if present) next to the image NAME.<ext>
    searched recursively; a sub-folder named train/val/test sets the split
    """
    channel_names = "as stored"

    def __init__(self, split: str = "train") -> None:
        self.split = split

    def items(self, raw: Path) -> list[Item]:
        items = []
        for seg in sorted(raw.rglob("*_seg.npy")):
            base = seg.name[: -len("_seg.npy")]
            img = next(
                (
                    seg.with_name(base + s)
                    for s in IMAGE_SUFFIXES
                    if s != ".npy" and seg.with_name(base + s).exists()
                ),
                None,
            )
            ref_img = rel(img, raw) if img is not None else ""
            items.append(
                Item(
                    name=safe_name(Path(rel(seg.with_name(base), raw)).as_posix()),
                    split=_split_of(seg, raw, self.split),
                    ref=(rel(seg, raw), ref_img),
                    source=ref_img or rel(seg, raw),
                )
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        path = raw / item.ref[0]
        try:
            # Cellpose stores a pickled dict; only open _seg.npy files you trust.
            dat = np.load(path, allow_pickle=True).item()
        except (ValueError, OSError, AttributeError) as exc:
            raise InputFileError(path, f"not a Cellpose _seg.npy file ({exc})") from exc
        if not isinstance(dat, dict) or "masks" not in dat:
            raise InputFileError(path, "no 'masks' entry (not a Cellpose _seg.npy file)")
        masks = np.asarray(dat["masks"])
        if masks.ndim != 2:
            raise InputFileError(path, f"masks must be 2-D, got {masks.shape}")
        if item.ref[1]:
            image = read_image(raw / item.ref[1])
        elif "img" in dat:
            image = np.asarray(dat["img"])
        else:
            raise InputFileError(path, "image missing: no NAME.<ext> beside it and no 'img' entry")
        return Example(image, masks.astype(np.int64))
