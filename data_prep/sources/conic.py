"""CoNIC (Lizard colon H&E patches): images.npy (N,256,256,3) + labels.npy (N,256,256,2)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data_prep.sources.arrays import open_npy
from data_prep.sources.base import Example, Item, LayoutError, Source, hash_split, rel


class CoNIC(Source):
    name = "conic"
    title = "CoNIC 2022 colon H&E nuclei (Lizard patches 256x256, 20x)"
    license = "CC BY-NC-SA 4.0"
    size = "4,981 patches, ~0.5M nuclei"
    homepage = "https://conic-challenge.grand-challenge.org"
    manual = """  Google Drive folder (or the challenge page after registration):
  1. https://drive.google.com/drive/folders/1il9jG7uA4-ebQ_lNmXbbF2eOK9uNwheb -> images.npy, labels.npy,
     patch_info.csv, counts.csv
  2. put them in RAW, then: cpsam prep convert conic --raw RAW --out OUT
  Do not also convert Lizard (same pixels)."""
    layout = """
    images.npy uint8 (N, 256, 256, 3); labels.npy (N, 256, 256, 2): [..., 0] instance ids, [..., 1] class
    patch_info.csv (optional): source image of each patch, used to split by source image (10% val)
    """
    channel_names = "R,G,B"

    def items(self, raw: Path) -> list[Item]:
        img, lab = raw / "images.npy", raw / "labels.npy"
        for p in (img, lab):
            if not p.exists():
                raise LayoutError(p, f"missing; expected:\n{self.layout}")
        n, n_lab = open_npy(str(img)).shape[0], open_npy(str(lab)).shape[0]
        if n != n_lab or open_npy(str(lab)).shape[-1] != 2:
            raise LayoutError(
                lab, f"expected (N, H, W, 2) matching {n} images, got {open_npy(str(lab)).shape}"
            )
        keys = [str(i) for i in range(n)]
        info = raw / "patch_info.csv"
        if info.exists():
            with open(info, newline="") as fh:
                rows = [r for r in csv.reader(fh) if r]
            rows = rows[1:] if rows and not rows[0][0][:1].isdigit() and len(rows) == n + 1 else rows
            if len(rows) != n:
                raise LayoutError(info, f"has {len(rows)} rows for {n} patches")
            keys = [r[0].rsplit("-", 1)[0] for r in rows]  # "<source image>-<patch index>"
        return [
            Item(
                name=f"{i:05d}",
                split=hash_split(keys[i]),
                ref=(rel(img, raw), rel(lab, raw), i),
                source=f"images.npy[{i}]",
            )
            for i in range(n)
        ]

    def load(self, raw: Path, item: Item) -> Example:
        ip, lp, i = item.ref
        image = np.asarray(open_npy(str(raw / ip))[i]).astype(np.uint8)
        return Example(image, np.rint(np.asarray(open_npy(str(raw / lp))[i, ..., 0])).astype(np.int64))
