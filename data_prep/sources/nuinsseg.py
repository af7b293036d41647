"""CryoNuSeg and NuInsSeg (H&E nuclei, 40x): use the corrected `label masks modify` folders.

Pitfall: `label masks` holds the SUM of per-object masks (overlap pixels get invalid ids);
`label masks modify` holds the per-pixel max and is the one to use.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.sources.base import rel
from data_prep.sources.pairs import LabelPairSource


class CryoNuSeg(LabelPairSource):
    name = "cryonuseg"
    title = "CryoNuSeg frozen-section H&E nuclei (30 tiles 512x512, 10 organs)"
    license = "unconfirmed (Kaggle dataset; code repo MIT)"
    size = "30 images, ~7.6k nuclei, ~100 MB"
    homepage = "https://github.com/masih4/CryoNuSeg"
    manual = """  Kaggle account + API token needed:
  1. kaggle datasets download ipateam/segmentation-of-nuclei-in-cryosectioned-he-images
  2. unzip into RAW (RAW/tissue images, RAW/Annotator 1 (biologist)/label masks modify)
  3. cpsam prep convert cryonuseg --raw RAW --out OUT"""
    layout = """
    tissue images/*.tif + Annotator 1 (biologist)/label masks modify/<same stem>.tif
    (annotator 1, first round; NOT `label masks`, which sums overlapping objects)
    no official split: 10% val by a hash of the TCGA slide id
    """
    roots = (("tissue images", "hash"), ("**/tissue images", "hash"))
    image_patterns = ("*.tif", "*.tiff", "*.png")
    channel_names = "R,G,B"
    annotator = "Annotator 1 (biologist)"

    def mask_for(self, image: Path) -> Path:
        return image.parent.parent / self.annotator / "label masks modify" / f"{image.stem}.tif"

    def split_key(self, image: Path, raw: Path) -> str:
        return "-".join(image.stem.split("-")[:3])

    def items(self, raw):
        seen, out = set(), []
        for it in super().items(raw):  # the two root patterns can both match raw/"tissue images"
            if it.ref not in seen:
                seen.add(it.ref)
                out.append(it)
        return out


class NuInsSeg(LabelPairSource):
    name = "nuinsseg"
    title = "NuInsSeg H&E nuclei, 31 human and mouse organs (665 tiles 512x512)"
    license = "CC BY 4.0"
    size = "665 images, ~31k nuclei, ~1.5 GB"
    homepage = "https://github.com/masih4/NuInsSeg"
    manual = """  Kaggle (ipateam/nuinsseg, account + API token) or Zenodo:
  1. https://zenodo.org/record/10518968/files/NuInsSeg.zip  (or kaggle datasets download ipateam/nuinsseg)
  2. unzip into RAW so that RAW/<organ>/tissue images and RAW/<organ>/label masks modify exist
  3. cpsam prep convert nuinsseg --raw RAW --out OUT"""
    layout = """
    <organ>/tissue images/*.png + <organ>/label masks modify/<same stem>.tif
    no official split: 10% val by a hash of organ/stem
    """
    roots = (("*/tissue images", "hash"),)
    image_patterns = ("*.png", "*.tif")
    channel_names = "R,G,B"

    def mask_for(self, image: Path) -> Path:
        return image.parent.parent / "label masks modify" / f"{image.stem}.tif"

    def split_key(self, image: Path, raw: Path) -> str:
        return rel(image, raw)
