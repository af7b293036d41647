"""Sample images with true masks that any fresh machine can obtain (the demo's and the study's fallbacks)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

# The setting ../shared/weights/README.md used with cellpose 3.1.1.2 on a DSB 2018 image
# (scores there and here: docs/results/demo.md). cyto_0 is a cytoplasm
# model: it draws nuclei a little large, so a diameter below the true median (23.7 px) works best.
STARDIST_NUCLEI_DIAMETER = 20.0


@dataclass
class Sample:
    """One demo image. image: (H, W) or (C, H, W); masks: (H, W) labels or None; diameter in px."""

    name: str
    source: str
    image: np.ndarray
    masks: np.ndarray | None
    diameter: float


def stardist_nuclei_sample() -> Sample | None:
    """The DSB2018 nuclei image shipped in the stardist wheel, or None when stardist is not installed."""
    spec = importlib.util.find_spec("stardist")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data" / "images"
    image_path, mask_path = folder / "img2d.tif", folder / "mask2d.tif"
    if not (image_path.is_file() and mask_path.is_file()):
        return None
    return Sample("dsb2018_nuclei", "stardist wheel (DSB 2018)", tifffile.imread(image_path),
                  tifffile.imread(mask_path), STARDIST_NUCLEI_DIAMETER)
