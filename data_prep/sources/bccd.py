"""BCCD with masks (Kaggle): brightfield blood smears with binary masks -> connected components."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam.io import read_image
from data_prep.labels import remove_small, semantic_to_instances
from data_prep.sources.base import Example, Item
from data_prep.sources.pairs import LabelPairSource


class BCCD(LabelPairSource):
    name = "bccd"
    title = "BCCD blood-smear brightfield (semantic masks -> connected components)"
    license = "MIT per Kaggle page (unconfirmed)"
    size = "1,328 images"
    homepage = "https://www.kaggle.com/datasets/jeetblahiri/bccd-dataset-with-mask"
    manual = """  Kaggle account + API token needed:
  1. kaggle datasets download jeetblahiri/bccd-dataset-with-mask
  2. unzip into RAW (RAW/BCCD Dataset with mask/{train,test}/{original,mask})
  3. cpsam prep convert bccd --raw RAW --out OUT"""
    layout = """
    BCCD Dataset with mask/{train,test}/original/*.png + .../mask/<same name>.png (binary, maybe RGB)
    mask > 127 (JPEG-like noise) -> 4-connected components >= 10 px; touching cells merge
    """
    roots = (("**/train/original", "train"), ("**/test/original", "test"))
    image_patterns = ("*.png", "*.jpg")
    channel_names = "R,G,B"
    min_size = 10

    def mask_for(self, image: Path) -> Path:
        for cand in (image.name, image.with_suffix(".png").name):
            p = image.parent.parent / "mask" / cand
            if p.exists():
                return p
        return image.parent.parent / "mask" / image.name

    def load(self, raw: Path, item: Item) -> Example:
        mask = read_image(raw / item.ref[1])
        mask = mask[..., 0] if mask.ndim == 3 else mask
        labels = remove_small(semantic_to_instances(mask, threshold=127), self.min_size)
        return Example(read_image(raw / item.ref[0]), np.asarray(labels))
