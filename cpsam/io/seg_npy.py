"""NAME_seg.npy: the file the cellpose GUI opens (masks, outlines, flows), built and written atomically.

Read one back with `cpsam.safe_npy` (no pickled code runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cpsam.io.atomic import atomic_path
from cpsam.io.images import label_dtype
from cpsam.io.overlays import _percentile_uint8, flows_to_rgb, masks_to_outlines


def seg_npy_dict(
    masks: np.ndarray,
    dP: np.ndarray,
    cellprob: np.ndarray,
    image_path: str | os.PathLike[str],
    *,
    channels: list[int] | None = None,
    diameter: float | None = None,
) -> dict:
    """The dict the cellpose GUI loads from NAME_seg.npy (keys of cellpose's masks_flows_to_seg).

    masks (H, W) labels; dP (2, H, W) float32 flows; cellprob (H, W) float32 logits.
    Keys: outlines (labels on boundary pixels), masks, chan_choose, ismanual, filename, diameter,
    flows = [flow colours (1, H, W, 3) uint8, cell probability (1, H, W) uint8, zeros (1, H, W, 3)
    uint8, [] (no final pixel positions), (3, H, W) float32 [dY, dX, cellprob]].
    """
    masks = np.asarray(masks)
    n = int(masks.max()) if masks.size else 0
    dtype = label_dtype(n)
    outlines = masks * masks_to_outlines(masks)
    rgb = flows_to_rgb(dP)
    flows = [
        rgb[np.newaxis],
        _percentile_uint8(cellprob)[np.newaxis],
        np.zeros((1, *rgb.shape), np.uint8),
        [],
        np.concatenate((np.asarray(dP, np.float32), np.asarray(cellprob, np.float32)[np.newaxis]), axis=0),
    ]
    return {
        "outlines": outlines.astype(dtype),
        "masks": masks.astype(dtype),
        "chan_choose": list(channels) if channels is not None else [0, 0],
        "ismanual": np.zeros(n, bool),
        "filename": str(image_path),
        "flows": flows,
        "diameter": float(diameter) if diameter else np.nan,
    }


def write_seg_npy(path: str | os.PathLike[str], seg: dict) -> Path:
    """Save a `seg_npy_dict` as a pickled .npy (what the cellpose GUI opens), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.array(seg, dtype=object), allow_pickle=True)
    return Path(path)
