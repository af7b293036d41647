"""TNBC (Naylor et al.) H&E nuclei: binary GT PNGs -> connected components."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam.io import read_image
from data_prep.labels import semantic_to_instances
from data_prep.sources.base import Download, Example, Item
from data_prep.sources.pairs import LabelPairSource


class TNBC(LabelPairSource):
    name = "tnbc"
    title = "TNBC triple-negative breast cancer H&E nuclei (50 tiles 512x512, 40x)"
    license = "CC BY 4.0"
    size = "50 images, ~4k nuclei, 30 MB"
    homepage = "https://zenodo.org/records/1175282"
    downloads = (
        Download(
            "https://zenodo.org/records/1175282/files/TNBC_NucleiSegmentation.zip",
            "TNBC_NucleiSegmentation.zip",
            "da708c3a988f4ad4b9bbb9283b387faf703f0bc0e5e689927306bd27ea13a57f",
        ),
    )
    layout = """
    [TNBC_NucleiSegmentation/]Slide_XX/*.png + GT_XX/<same name>.png (binary)
    instances = 4-connected components of the binary GT; alpha dropped; __MACOSX ignored
    no official split: 10% val by a hash of the slide (patient)
    """
    roots = (("Slide_*", "hash"), ("*/Slide_*", "hash"))
    image_patterns = ("*.png",)
    channel_names = "R,G,B"

    def mask_for(self, image: Path) -> Path:
        return image.parent.parent / image.parent.name.replace("Slide_", "GT_") / image.name

    def split_key(self, image: Path, raw: Path) -> str:
        return image.parent.name

    def load(self, raw: Path, item: Item) -> Example:
        mask = read_image(raw / item.ref[1])
        mask = mask[..., 0] if mask.ndim == 3 else mask
        image = read_image(raw / item.ref[0])
        return Example(image[..., :3] if image.ndim == 3 else image, np.asarray(semantic_to_instances(mask)))
