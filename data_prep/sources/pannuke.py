"""PanNuke (H&E nuclei, 19 tissues): per-fold images.npy + masks.npy (N, 256, 256, 6).

Pitfall: masks channels 0-4 are per-class instance maps and channel 5 (the LAST) is background;
ids may collide across classes, so each class channel is offset before merging.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep.labels import merge_instance_channels
from data_prep.sources.arrays import open_npy
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel

_W = "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/"
_SHA = {
    1: "6e19ad380300e8ce9480f9ab6a14cc91fa4b6a511609b40e3d70bdf9c881ed0b",
    2: "5bc540cc509f64b5f5a274d6e5a245527dbd3e6d3155d43555115c5d54709b07",
    3: "c14d372981c42f611ebc80afad01702b89cad8c1b3089daa31931cf5a4b1a39d",
}
_FOLD_SPLIT = {1: "train", 2: "val", 3: "test"}


class PanNuke(Source):
    name = "pannuke"
    title = "PanNuke H&E nuclei, 19 tissues, 256x256 at 40x"
    license = "CC BY-NC-SA 4.0"
    size = "~7,900 patches in 3 folds, ~2 GB"
    homepage = "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/"
    downloads = tuple(Download(f"{_W}fold_{k}.zip", f"fold_{k}.zip", _SHA[k]) for k in (1, 2, 3))
    layout = """
    Fold k/images/foldk/images.npy (N,256,256,3, float) + Fold k/masks/foldk/masks.npy (N,256,256,6)
    masks[..., 0:5] class instance maps (merged), masks[..., 5] background (ignored)
    fold 1 -> train, fold 2 -> val, fold 3 -> test
    """
    channel_names = "R,G,B"

    def items(self, raw: Path) -> list[Item]:
        items = []
        for img in sorted(raw.glob("**/images.npy")):
            m = re.search(r"fold\s*_?(\d)", rel(img, raw), re.IGNORECASE)
            if not m:
                continue
            k = int(m.group(1))
            masks = sorted(
                p for p in raw.glob("**/masks.npy") if re.search(rf"fold\s*_?{k}", rel(p, raw), re.I)
            )
            if not masks:
                raise LayoutError(
                    img.parent.parent.parent / "masks" / f"fold{k}" / "masks.npy",
                    f"masks of fold {k} are missing",
                )
            ni, ms = open_npy(str(img)).shape, open_npy(str(masks[0])).shape
            if len(ms) != 4 or ms[-1] != 6 or ms[0] != ni[0]:
                raise LayoutError(masks[0], f"expected (N, H, W, 6) with N = {ni[0]}, got {ms}")
            items += [
                Item(
                    name=f"fold{k}_{i:05d}",
                    split=_FOLD_SPLIT.get(k, "train"),
                    ref=(rel(img, raw), rel(masks[0], raw), i),
                    source=f"{rel(img, raw)}[{i}]",
                )
                for i in range(ni[0])
            ]
        if not items:
            raise LayoutError(
                raw / "Fold 1" / "images" / "fold1" / "images.npy", f"missing; expected:\n{self.layout}"
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        ip, mp, i = item.ref
        image = np.clip(np.rint(np.asarray(open_npy(str(raw / ip))[i])), 0, 255).astype(np.uint8)
        masks = np.rint(np.asarray(open_npy(str(raw / mp))[i])).astype(np.int64)
        return Example(image, np.asarray(merge_instance_channels([masks[..., c] for c in range(5)])))
