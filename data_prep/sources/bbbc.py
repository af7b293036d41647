"""BBBC038 (Kaggle DSB 2018: one binary PNG per nucleus) and BBBC039 (graph-coloured masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam.io import read_image
from data_prep.labels import split_components
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel, sorted_files

_BBBC = "https://data.broadinstitute.org/bbbc/"


class BBBC038(Source):
    name = "bbbc038"
    title = "BBBC038 / Kaggle Data Science Bowl 2018 nuclei (fluorescence, brightfield, H&E)"
    license = "CC0 (BBBC page; unconfirmed)"
    size = "670 stage-1 training images"
    homepage = "https://bbbc.broadinstitute.org/BBBC038"
    downloads = (
        Download(
            "https://github.com/ibmua/data-science-bowl-2018-train-set/raw/master/train-hand.zip",
            "train-hand.zip",
            "d218b8706cd7b9a2d7171268a6e99c7b0e94605af46521ff2ffd5a17708b1af6",
        ),
    )
    layout = """
    <any>/<ImageId>/images/<ImageId>.png + <any>/<ImageId>/masks/*.png (one binary PNG per nucleus) -> train
    alpha dropped; grey images stored as R = G = B become one channel; overlapping mask pixels:
    the later mask (sorted by file name) wins
    """
    channel_names = "grey or R,G,B"

    def items(self, raw: Path) -> list[Item]:
        items = []
        for img_dir in sorted(raw.glob("**/images")):
            case = img_dir.parent
            img = case / "images" / f"{case.name}.png"
            if not img.exists() or not (case / "masks").is_dir():
                continue
            items.append(
                Item(
                    name=case.name,
                    split="train",
                    ref=(rel(img, raw), rel(case / "masks", raw)),
                    source=rel(img, raw),
                )
            )
        if not items:
            raise LayoutError(raw / "stage1_train", f"no DSB cases found; expected:\n{self.layout}")
        return items

    def load(self, raw: Path, item: Item) -> Example:
        image = read_image(raw / item.ref[0])
        if image.ndim == 3:
            image = image[..., :3]
            if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
                image = image[..., 0]
        labels = np.zeros(image.shape[:2], np.int32)
        for k, mp in enumerate(sorted_files(raw / item.ref[1], ("*.png",)), start=1):
            m = read_image(mp)
            m = m[..., 0] if m.ndim == 3 else m
            if m.shape != labels.shape:
                raise LayoutError(mp, f"mask shape {m.shape} differs from image shape {labels.shape}")
            labels[m > 0] = k
        return Example(image, labels)


class BBBC039(Source):
    name = "bbbc039"
    title = "BBBC039 U2OS Hoechst nuclei (200 fields 520x696, 16-bit)"
    license = "CC0 (BBBC page; unconfirmed)"
    size = "200 images, 23.6k nuclei, 80 MB"
    homepage = "https://bbbc.broadinstitute.org/BBBC039"
    downloads = tuple(
        Download(f"{_BBBC}BBBC039/{f}.zip", f"BBBC039_{f}.zip") for f in ("images", "masks", "metadata")
    )
    layout = """
    images/*.tif + masks/<same stem>.png + metadata/{training,validation,test}.txt
    masks are RGBA PNG whose RED channel is a graph colouring (a few colours), not instance ids:
    instances = 4-connected components within each colour
    """
    channel_names = "Hoechst"

    def items(self, raw: Path) -> list[Item]:
        meta = raw / "metadata"
        split_of: dict[str, str] = {}
        for fname, split in (("training.txt", "train"), ("validation.txt", "val"), ("test.txt", "test")):
            p = meta / fname
            if not p.exists():
                raise LayoutError(p, "split list is missing (download metadata.zip)")
            for line in p.read_text().split():
                split_of[Path(line).stem] = split
        items = []
        for stem, split in sorted(split_of.items()):
            img, mask = raw / "images" / f"{stem}.tif", raw / "masks" / f"{stem}.png"
            for p in (img, mask):
                if not p.exists():
                    raise LayoutError(p, f"listed in metadata/ but missing (example {stem})")
            items.append(
                Item(name=stem, split=split, ref=(rel(img, raw), rel(mask, raw)), source=rel(img, raw))
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        colours = read_image(raw / item.ref[1])
        colours = colours[..., 0] if colours.ndim == 3 else colours
        return Example(read_image(raw / item.ref[0]), np.asarray(split_components(colours, connectivity=1)))
