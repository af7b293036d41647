"""LIVECell (phase contrast, 8 cell lines): COCO JSON polygons with overlapping annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpsam.io import read_image
from data_prep.labels import polygon_pixels, resolve_overlaps
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel

_S3 = "http://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021/"


def rle_pixels(rle: dict, path: Path) -> np.ndarray:
    """Flat row-major pixel indices of an uncompressed COCO RLE ({"size": [H, W], "counts": [...]})."""
    counts = rle.get("counts")
    if isinstance(counts, str):
        raise LayoutError(
            path, "compressed COCO RLE annotations are not supported; decode them with pycocotools"
        )
    h, w = rle["size"]
    col_major = np.zeros(h * w, bool)
    pos = 0
    for k, c in enumerate(counts):
        if k % 2:
            col_major[pos : pos + c] = True
        pos += c
    r, c = np.nonzero(col_major.reshape(w, h).T)
    return r.astype(np.int64) * w + c


class LIVECell(Source):
    name = "livecell"
    title = "LIVECell phase-contrast cell lines (A172, BT474, BV2, Huh7, MCF7, SHSY5Y, SkBr3, SKOV3)"
    license = "CC BY-NC 4.0"
    size = "5,239 images 704x520, 1.7M cells, images.zip 1.3 GB"
    homepage = "https://sartorius-research.github.io/LIVECell/"
    downloads = (
        Download(_S3 + "images.zip", "images.zip"),
        *(
            Download(_S3 + f"annotations/LIVECell/livecell_coco_{s}.json", f"livecell_coco_{s}.json")
            for s in ("train", "val", "test")
        ),
    )
    layout = """
    livecell_coco_{train,val,test}.json (anywhere under RAW)
    images/livecell_train_val_images/[<CellType>/]<file>.tif
    images/livecell_test_images/[<CellType>/]<file>.tif
    overlaps resolved as in the Cellpose papers: objects >= 75% covered by others dropped, the rest
    of each overlap goes to the nearest centroid
    """
    channel_names = "phase"

    def _image(self, raw: Path, split: str, fname: str) -> Path:
        folder = "livecell_test_images" if split == "test" else "livecell_train_val_images"
        cell_type = fname.split("_")[0]
        for cand in (
            raw / "images" / folder / cell_type / fname,
            raw / "images" / folder / fname,
            raw / folder / cell_type / fname,
            raw / folder / fname,
        ):
            if cand.exists():
                return cand
        raise LayoutError(
            raw / "images" / folder / cell_type / fname, "image listed in the COCO JSON is missing"
        )

    def items(self, raw: Path) -> list[Item]:
        items = []
        for split in ("train", "val", "test"):
            hits = sorted(raw.glob(f"**/livecell_coco_{split}.json"))
            if not hits:
                continue
            path = hits[0]
            try:
                coco = json.loads(path.read_text())
                images = {im["id"]: im for im in coco["images"]}
                anns: dict[int, list] = {i: [] for i in images}
                for a in coco["annotations"]:
                    anns[a["image_id"]].append(a["segmentation"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LayoutError(path, f"not a COCO annotation file ({type(exc).__name__}: {exc})") from exc
            for iid, im in sorted(images.items()):
                img = self._image(raw, split, im["file_name"])
                items.append(
                    Item(
                        name=f"{split}_{Path(im['file_name']).stem}",
                        split=split,
                        ref=(rel(img, raw), rel(path, raw), anns[iid]),
                        source=rel(img, raw),
                    )
                )
        if not items:
            raise LayoutError(
                raw / "livecell_coco_train.json", f"no LIVECell COCO JSON found; expected:\n{self.layout}"
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        image = read_image(raw / item.ref[0])
        shape = image.shape[:2]
        objects = []
        for seg in item.ref[2]:
            if isinstance(seg, dict):
                objects.append(rle_pixels(seg, raw / item.ref[1]))
            else:  # a list of polygons [x0, y0, x1, y1, ...] of one object
                parts = [polygon_pixels(np.asarray(p, np.float64).reshape(-1, 2), shape) for p in seg]
                objects.append(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64))
        labels = resolve_overlaps(objects, shape) if objects else np.zeros(shape, np.uint16)
        return Example(image, labels)
