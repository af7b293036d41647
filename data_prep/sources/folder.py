"""Your own data: a plain folder of image/mask pairs, or Cellpose GUI `_seg.npy` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam import pairing
from cpsam.io import IMAGE_SUFFIXES, InputFileError, read_image
from data_prep.sources.base import Example, Item, Source, rel, safe_name

_LOOKED_FOR = ("NAME_masks.*, _cp_masks, _mask, _labels, _label, NAME_seg.npy, "
               "or masks/NAME.* beside images/")
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
    NAME_img.tif + NAME_masks.tif, or NAME.tif + NAME_masks.tif (Cellpose convention; also _cp_masks,
    _mask, _labels, _label, NAME_seg.npy; any of .tif .tiff .png .npy ...), searched recursively;
    or images/NAME.ext + masks/NAME.ext (the rule of cpsam.pairing).
    Masks: 2-D integer instance ids, 0 = background. A sub-folder named train/val/test sets the split,
    otherwise --split (default train).
    """
    channel_names = "as stored"

    def __init__(self, split: str = "train") -> None:
        self.split = split

    def items(self, raw: Path) -> list[Item]:
        """Image/label pairs by `cpsam.pairing`, folder by folder; every image without a label, label file
        without an image, and label file passed over for one that takes precedence becomes an item whose
        `load` raises InputFileError naming the file (listed and counted, never fatal)."""
        pairs: list[tuple[Path, Path]] = []
        orphans: list[tuple[Path, str]] = []
        for folder in [raw, *sorted(d for d in raw.rglob("*") if d.is_dir())]:
            if folder != raw and folder.name == "masks" and (folder.parent / "images").is_dir():
                continue  # paired with images/ beside it
            masks_dir = folder.parent / "masks"
            found = pairing.pair_folder(
                folder, masks_dir if folder != raw and folder.name == "images" and masks_dir.is_dir() else None)
            pairs += found.pairs
            orphans += [(p, f"image without a mask (looked for {_LOOKED_FOR})") for p in found.unlabelled]
            orphans += [(p, f"image without a mask: its mask {m.name} belongs to another image")
                        for p, m in found.contested]
            orphans += [(m, f"mask not used: {first.name} takes precedence") for m, first in found.shadowed]
            for m in found.orphans:
                if m.parent == folder:
                    base = m.stem[: -len(pairing.label_tag(m.name) or "")]
                    orphans.append((m, f"mask without an image beside it (looked for {base}{{_img,_image,}}.*)"))
                else:
                    orphans.append((m, f"mask without an image (looked for {folder / m.stem}.*)"))
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
        return Example(read_image(raw / item.ref[0]), pairing.read_label_file(raw / item.ref[1]))


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
        for seg in sorted(raw.rglob("*" + pairing.SEG_NPY)):
            base = seg.name[: -len(pairing.SEG_NPY)]
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
        dat = pairing.read_seg_npy(path)  # a pickled dict, read without running code; masks checked
        masks = np.asarray(dat["masks"])
        if item.ref[1]:
            image = read_image(raw / item.ref[1])
        elif "img" in dat:
            image = np.asarray(dat["img"])
        else:
            raise InputFileError(path, "image missing: no NAME.<ext> beside it and no 'img' entry")
        return Example(image, masks.astype(np.int64))
