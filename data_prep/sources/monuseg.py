"""MoNuSeg 2018 (H&E nuclei, 40x): TIFF tiles with Aperio XML polygons."""

from __future__ import annotations

from pathlib import Path

from cpsam.io import read_image
from data_prep.labels import rasterize_polygons
from data_prep.sources.aperio import read_regions
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel, sorted_files

_GD = "https://drive.google.com/uc?export=download&id="


class MoNuSeg(Source):
    name = "monuseg"
    title = "MoNuSeg 2018 H&E nuclei (Kumar TCGA tiles), 1000x1000 at 40x"
    license = "CC BY-NC-SA 4.0"
    size = "37 train + 14 test tiles, ~29k nuclei, ~40 MB"
    homepage = "https://monuseg.grand-challenge.org/Data/"
    downloads = (
        Download(
            _GD + "1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA",
            "MoNuSeg_train.zip",
            "25d3d3185bb2970b397cafa72eb664c9b4d24294aee382e7e3df9885affce742",
        ),
        Download(
            _GD + "1NKkSQ5T0ZNQ8aUhh0a8Dt2YKYCQXIViw",
            "MoNuSegTestData.zip",
            "13e522387ae8b1bcc0530e13ff9c7b4d91ec74959ef6f6e57747368d7ee6f88a",
        ),
    )
    layout = """
    MoNuSeg 2018 Training Data/Tissue Images/TCGA-*.tif
      + MoNuSeg 2018 Training Data/Annotations/TCGA-*.xml -> train
    MoNuSegTestData/TCGA-*.tif + MoNuSegTestData/TCGA-*.xml -> test (a Cellpose-SAM benchmark set)
    Every XML Region is one nucleus, ids start at 1; overlaps: the smaller nucleus stays on top.
    """
    channel_names = "R,G,B"

    def items(self, raw: Path) -> list[Item]:
        pairs: list[tuple[Path, Path, str]] = []
        for tif in sorted_files(raw, ("*Training*/Tissue Images/*.tif",)):
            pairs.append((tif, tif.parent.parent / "Annotations" / f"{tif.stem}.xml", "train"))
        for tif in sorted_files(raw, ("MoNuSegTestData/*.tif", "*/MoNuSegTestData/*.tif")):
            pairs.append((tif, tif.with_suffix(".xml"), "test"))
        if not pairs:
            raise LayoutError(raw / "MoNuSegTestData", f"no MoNuSeg tiles found; expected:\n{self.layout}")
        for tif, xml, _ in pairs:
            if not xml.exists():
                raise LayoutError(xml, f"annotation XML of {tif.name} is missing")
        return [
            Item(name=f"{sp}_{tif.stem}", split=sp, ref=(rel(tif, raw), rel(xml, raw)), source=rel(tif, raw))
            for tif, xml, sp in pairs
        ]

    def load(self, raw: Path, item: Item) -> Example:
        image = read_image(raw / item.ref[0])
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        regions = read_regions(raw / item.ref[1])
        labels = rasterize_polygons([r.vertices for r in regions], image.shape[:2])
        return Example(image, labels)
