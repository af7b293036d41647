"""TissueNet v1.0/v1.1 (DeepCell): npz files with X (N,H,W,2) images and y (N,H,W,2) labels.

Pitfall: the channel order differs: X[..., 0] = nuclear stain, X[..., 1] = membrane/cytoplasm;
y[..., 0] = WHOLE-CELL labels, y[..., 1] = nuclear labels. We store images as (2, H, W) =
[membrane/cytoplasm, nucleus] (Cellpose's order) and the whole-cell labels y[..., 0].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.sources.arrays import extract_npz_member, npz_member_shape, open_npy
from data_prep.sources.base import Example, Item, LayoutError, Source, rel

_SPLITS = ("train", "val", "test")


class TissueNet(Source):
    name = "tissuenet"
    title = "TissueNet v1.1 multiplexed tissue fluorescence, whole-cell labels"
    license = "modified Apache 2.0, non-commercial academic use only"
    size = "~2,600 train (512x512) + ~3,000 val + ~1,200 test (256x256) images, ~10 GB"
    homepage = "https://datasets.deepcell.org/data"
    manual = """  Needs a DeepCell account:
  1. sign in at https://datasets.deepcell.org/ and accept the licence
  2. download tissuenet_v1.1.zip (md5 cab3b8f242aaee02035557b93546d9dc) and unzip it into RAW
  3. cpsam prep convert tissuenet --raw RAW --out OUT"""
    layout = """
    tissuenet_v1.1_{train,val,test}.npz  (or {train,val,test}.npz) with keys X (N,H,W,2), y (N,H,W,2)
    X[...,0] nucleus, X[...,1] membrane; y[...,0] whole cell (used), y[...,1] nucleus
    the arrays are extracted once to RAW/.npz_cache/ for memory-mapping
    """
    channel_names = "cytoplasm,nucleus"
    label_channel = 0

    def _files(self, raw: Path) -> list[tuple[str, Path]]:
        out = []
        for split in _SPLITS:
            for cand in (f"tissuenet_v1.1_{split}.npz", f"tissuenet_v1.0_{split}.npz", f"{split}.npz"):
                hits = sorted(raw.glob(f"**/{cand}"))
                if hits:
                    out.append((split, hits[0]))
                    break
        if not out:
            raise LayoutError(
                raw / "tissuenet_v1.1_train.npz", f"no TissueNet npz found; expected:\n{self.layout}"
            )
        return out

    def items(self, raw: Path) -> list[Item]:
        items = []
        for split, npz in self._files(raw):
            xs, ys = npz_member_shape(npz, "X"), npz_member_shape(npz, "y")
            if len(xs) != 4 or xs[-1] != 2 or xs[:3] != ys[:3]:
                raise LayoutError(npz, f"expected X (N,H,W,2) and y (N,H,W,2), got X{xs} y{ys}")
            xp = extract_npz_member(npz, "X", raw / ".npz_cache")
            yp = extract_npz_member(npz, "y", raw / ".npz_cache")
            for i in range(xs[0]):
                items.append(
                    Item(
                        name=f"{split}_{i:05d}",
                        split=split,
                        ref=(rel(xp, raw), rel(yp, raw), i),
                        source=f"{rel(npz, raw)}[{i}]",
                    )
                )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        xp, yp, i = item.ref
        x = np.asarray(open_npy(str(raw / xp))[i])
        y = np.asarray(open_npy(str(raw / yp))[i])
        image = np.stack([x[..., 1], x[..., 0]])  # [membrane/cytoplasm, nucleus]
        return Example(image, np.rint(y[..., self.label_channel]).astype(np.int64))
