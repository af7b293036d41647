"""IHC TMA (SRSA-Net cohort, Zenodo 7647846): PNG + npy (3, H, W) negative/positive instance ids.

Pitfall: ids of channel 0 (negative nuclei) and channel 1 (positive nuclei) may repeat; channel 2
is an inverted foreground map, never labels. We offset channel-1 ids by max(channel 0) and split
any id painted on several separate regions.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cpsam.io import read_image
from data_prep.labels import merge_instance_channels, split_disconnected
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel, sorted_files

_FOLD_SPLIT = {"1": "train", "2": "val", "3": "test"}


class IHCTMA(Source):
    name = "ihc_tma"
    title = "IHC TMA multiplex-IHC nuclei (SRSA-Net, NSCLC TMAs, 256x256 patches)"
    license = "CC BY 4.0"
    size = "266 patches, ~9.7k nuclei"
    homepage = "https://zenodo.org/records/7647846"
    downloads = (
        Download(
            "https://zenodo.org/records/7647846/files/IHC_TMA_dataset.zip",
            "IHC_TMA_dataset.zip",
            "9dcc1c94b5d8af5383d3c91141617b1621904ee9bd6f69d2223e7f4363cc80d9",
        ),
    )
    layout = """
    [IHC_TMA_dataset/]images/fold{1,2,3}_<idx>_<stain>.png + masks/<same stem>.npy (3, H, W)
    fold1 -> train, fold2 -> val, fold3 -> test
    """
    channel_names = "R,G,B"

    def items(self, raw: Path) -> list[Item]:
        pngs = sorted_files(raw, ("images/fold*.png", "*/images/fold*.png"))
        if not pngs:
            raise LayoutError(
                raw / "IHC_TMA_dataset" / "images", f"no IHC TMA images; expected:\n{self.layout}"
            )
        items = []
        for png in pngs:
            npy = png.parent.parent / "masks" / f"{png.stem}.npy"
            if not npy.exists():
                raise LayoutError(npy, f"mask of {png.name} is missing")
            m = re.match(r"fold(\d)", png.stem)
            split = _FOLD_SPLIT.get(m.group(1), "train") if m else "train"
            items.append(
                Item(name=png.stem, split=split, ref=(rel(png, raw), rel(npy, raw)), source=rel(png, raw))
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        path = raw / item.ref[1]
        mask = np.load(path)
        if mask.ndim != 3 or mask.shape[0] != 3:
            raise LayoutError(path, f"expected a (3, H, W) mask array, got {mask.shape}")
        labels = merge_instance_channels([mask[0], mask[1]])
        image = read_image(raw / item.ref[0])
        return Example(image[..., :3] if image.ndim == 3 else image, np.asarray(split_disconnected(labels)))
