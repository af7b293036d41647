"""MoNuSAC 2020 (H&E nuclei, 4 classes): per-region TIFF + Aperio XML; Ambiguous -> ignore mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cpsam.io import read_image
from data_prep.labels import rasterize_polygons
from data_prep.sources.aperio import read_regions
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel, sorted_files

_GD = "https://drive.google.com/uc?export=download&id="


class MoNuSAC(Source):
    name = "monusac"
    title = "MoNuSAC 2020 H&E nuclei, 4 organs, 40x (classes dropped, Ambiguous -> ignore)"
    license = "CC BY-NC-SA 4.0"
    size = "209 train + 101 test regions, ~47k nuclei"
    homepage = "https://monusac-2020.grand-challenge.org/Data/"
    downloads = (
        Download(
            _GD + "1lxMZaAPSpEHLSxGA9KKMt_r-4S8dwLhq",
            "MoNuSAC_train.zip",
            "5b7cbeb34817a8f880d3fddc28391e48d3329a91bf3adcbd131ea149a725cd92",
        ),
        Download(
            _GD + "1G54vsOdxWY1hG7dzmkeK3r0xz9s-heyQ",
            "MoNuSAC_test.zip",
            "bcbc38f6bf8b149230c90c29f3428cc7b2b76f8acd7766ce9fc908fc896c2674",
        ),
    )
    layout = """
    MoNuSAC_images_and_annotations/<patient>/<region>.tif + <region>.xml   -> train
    MoNuSAC Testing Data and Annotations/<patient>/<region>.tif + .xml   -> test (Cellpose-SAM benchmark)
    (a folder whose name contains "Test" is the test split). Regions with <= 2 vertices are skipped;
    "Ambiguous" annotations become ignore/NAME.tif. A .tif missing next to its .svs must be exported first.
    """
    channel_names = "R,G,B"

    def items(self, raw: Path) -> list[Item]:
        xmls = sorted_files(raw, ("*/*/*.xml", "*/*.xml"))
        if not xmls:
            raise LayoutError(
                raw / "MoNuSAC_images_and_annotations", f"no MoNuSAC XML found; expected:\n{self.layout}"
            )
        items = []
        for xml in xmls:
            tif = xml.with_suffix(".tif")
            if not tif.exists():
                raise LayoutError(tif, f"image of {xml.name} is missing (export it from the .svs)")
            split = "test" if "test" in rel(xml, raw).split("/")[0].lower() else "train"
            items.append(
                Item(
                    name=f"{split}_{xml.stem}",
                    split=split,
                    ref=(rel(tif, raw), rel(xml, raw)),
                    source=rel(tif, raw),
                )
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        image = read_image(raw / item.ref[0])
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        regions = [r for r in read_regions(raw / item.ref[1]) if len(r.vertices) > 2]
        cells = [r.vertices for r in regions if r.group.lower() != "ambiguous"]
        labels = rasterize_polygons(cells, image.shape[:2])
        ignore = np.zeros(image.shape[:2], np.uint8)
        for r in regions:
            if r.group.lower() == "ambiguous":
                cv2.fillPoly(ignore, [np.round(r.vertices).astype(np.int32).reshape(-1, 1, 2)], 1)
        return Example(image, labels, ignore=ignore if ignore.any() else None)
