"""Label-image algebra shared by the converters: relabel, measure, rasterise, split, merge.

Every function takes and returns plain numpy arrays; a label image is (H, W) integer with
0 = background and 1..N one id per object.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import fastremap
import numpy as np
from scipy import ndimage

from cpsam.io import label_dtype
from cpsam.size import median_diameter  # noqa: F401 - re-exported: one definition, in cpsam


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber a (H, W) label image to 1..N keeping the order of the ids; 0 stays 0.

    A mask that is already consecutive comes back with identical values. Returns uint16 (uint32
    above 65535 objects).
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(labels.shape, np.uint16)
    if np.issubdtype(labels.dtype, np.floating):  # e.g. float64 .npy / .mat masks holding whole numbers
        if not (np.isfinite(labels).all() and np.all(np.mod(labels, 1) == 0)):
            raise ValueError(f"label image must hold integer ids, got {labels.dtype} values with fractions or NaN")
        labels = labels.astype(np.int64)
    elif not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"label image must hold integer ids, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"label image has negative ids (min {labels.min()}; 0 = background, 1..N objects)")
    ids = fastremap.unique(labels)
    ids = ids[ids != 0]
    dtype = label_dtype(len(ids))
    if ids.size == 0:
        return np.zeros(labels.shape, dtype)
    if ids[-1] == ids.size:  # already 1..N
        return labels.astype(dtype, copy=False)
    mapping = {int(old): i + 1 for i, old in enumerate(ids)}
    mapping[0] = 0
    out = fastremap.remap(np.ascontiguousarray(labels.astype(np.int64, copy=False)), mapping)
    return out.astype(dtype, copy=False)


def object_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of each object 1..N of a label image (background excluded), int64 (N,)."""
    ids, counts = fastremap.unique(np.asarray(labels), return_counts=True)
    return counts[ids > 0].astype(np.int64)


def count_objects(labels: np.ndarray) -> int:
    """Number of distinct non-zero ids."""
    return int(object_areas(labels).size)


def split_components(labels: np.ndarray, *, connectivity: int = 1, min_size: int = 0) -> np.ndarray:
    """Give every connected component of every id its own id (e.g. graph-coloured or semantic masks).

    `connectivity` 1 = 4-neighbourhood, 2 = 8-neighbourhood. Components under `min_size` pixels are
    dropped. Components of different ids never merge even when they touch. Returns consecutive labels.
    """
    labels = np.asarray(labels)
    structure = ndimage.generate_binary_structure(2, connectivity)
    out = np.zeros(labels.shape, np.int64)
    offset = 0
    for value in fastremap.unique(labels):
        if value == 0:
            continue
        comp, n = ndimage.label(labels == value, structure=structure)
        out[comp > 0] = comp[comp > 0] + offset
        offset += n
    if min_size > 0:
        out = remove_small(out, min_size)
    return relabel_consecutive(out)


def split_disconnected(
    labels: np.ndarray, *, min_fraction: float = 0.25, connectivity: int = 2
) -> np.ndarray:
    """Split ids that are painted on several substantial, separate regions (e.g. ncolor labels).

    For every id with several connected components, each component of at least `min_fraction` of
    the largest one becomes its own object; smaller stray fragments keep the id of the largest.
    Returns consecutive labels (ids of untouched objects keep their relative order).
    """
    labels = np.asarray(labels)
    structure = ndimage.generate_binary_structure(2, connectivity)
    out = labels.astype(np.int64, copy=True)
    next_id = int(labels.max()) + 1
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(labels[sl] == i, structure=structure)
        if n < 2:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        view = out[sl]
        for c in range(1, n + 1):
            if c != largest and sizes[c - 1] >= min_fraction * sizes[largest - 1]:
                view[comp == c] = next_id
                next_id += 1
    return relabel_consecutive(out)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero every object smaller than `min_size` pixels (ids are not renumbered)."""
    labels = np.array(labels, copy=True)
    ids, counts = fastremap.unique(labels, return_counts=True)
    small = ids[(counts < min_size) & (ids > 0)]
    if small.size:
        labels[np.isin(labels, small)] = 0
    return labels


def semantic_to_instances(mask: np.ndarray, *, threshold: float = 0, connectivity: int = 1) -> np.ndarray:
    """Instances of a binary/semantic mask as its connected components (mask > threshold)."""
    fg = np.asarray(mask) > threshold
    comp, _ = ndimage.label(fg, structure=ndimage.generate_binary_structure(2, connectivity))
    return relabel_consecutive(comp)


def merge_instance_channels(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Merge several instance maps (e.g. one per class) into one label image.

    Ids of each channel are offset by the running maximum so ids that repeat across channels stay
    distinct; where channels overlap, the later channel wins. Returns consecutive labels.
    """
    out = np.zeros(np.asarray(channels[0]).shape, np.int64)
    offset = 0
    for ch in channels:
        ch = np.asarray(ch).astype(np.int64)
        fg = ch > 0
        out[fg] = ch[fg] + offset
        offset += int(ch.max()) if fg.any() else 0
    return relabel_consecutive(out)


def rasterize_polygons(
    polygons: Sequence[np.ndarray], shape: tuple[int, int], *, order: str = "large_first"
) -> np.ndarray:
    """Paint polygons (each (K, 2) float [x, y] = [column, row] pixel coordinates) into labels.

    Polygon i gets id i+1 (ids start at 1, so the first polygon is never lost). Vertices outside
    the image are clipped by the painter. Overlaps are resolved deterministically: with
    `order="large_first"` larger polygons are painted first so a smaller overlapping object stays
    visible; `order="given"` paints in list order (later wins). Polygons with fewer than 3 vertices
    or that cover no pixel are skipped. Returns consecutive labels (H, W).
    """
    if order not in ("large_first", "given"):
        raise ValueError(f"unknown order {order!r}")
    pts = [np.round(np.asarray(p, np.float64)).astype(np.int32).reshape(-1, 1, 2) for p in polygons]
    idx = [i for i, p in enumerate(pts) if len(p) >= 3]
    if order == "large_first":
        areas = {i: abs(cv2.contourArea(pts[i].astype(np.float32))) for i in idx}
        idx.sort(key=lambda i: (-areas[i], i))
    canvas = np.zeros(shape, np.int32)
    for i in idx:
        cv2.fillPoly(canvas, [pts[i]], int(i + 1))
    return relabel_consecutive(canvas)


def polygon_pixels(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Flat (row * W + col) indices of the pixels a polygon ((K, 2) [x, y]) covers, int64 sorted."""
    pts = np.round(np.asarray(polygon, np.float64)).astype(np.int32).reshape(-1, 2)
    if len(pts) < 3:
        return np.zeros(0, np.int64)
    x0, y0 = np.clip(pts.min(0), 0, None)
    x1, y1 = np.minimum(pts.max(0) + 1, (shape[1], shape[0]))
    if x1 <= x0 or y1 <= y0:
        return np.zeros(0, np.int64)
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(crop, [(pts - (x0, y0)).reshape(-1, 1, 2)], 1)
    r, c = np.nonzero(crop)
    return (r + y0).astype(np.int64) * shape[1] + (c + x0)


def resolve_overlaps(
    objects: Sequence[np.ndarray], shape: tuple[int, int], *, drop_fraction: float = 0.75
) -> np.ndarray:
    """Turn possibly overlapping object masks into one label image (LIVECell-style annotations).

    Follows the rule the Cellpose papers describe for LIVECell (our own sparse implementation): an
    object whose pixels are >= `drop_fraction` covered by other objects is dropped; every remaining
    pixel claimed by several objects goes to the object whose centroid is nearest (ties: lower index).
    `objects`: one entry per object, a (H, W) bool mask or a 1-D array of flat pixel indices.
    Returns consecutive labels (H, W), ids in the order of `objects`.
    """
    h, w = shape
    flat = [np.flatnonzero(o) if o.ndim == 2 else np.unique(np.asarray(o, np.int64)) for o in objects]
    if not flat:
        return np.zeros(shape, np.uint16)
    owner = np.concatenate([np.full(len(f), k, np.int64) for k, f in enumerate(flat)])
    pix = np.concatenate(flat).astype(np.int64)
    coverage = np.bincount(pix, minlength=h * w)
    areas = np.array([len(f) for f in flat])
    shared = np.bincount(owner, weights=coverage[pix] > 1, minlength=len(flat))
    keep = (areas > 0) & (shared < drop_fraction * np.maximum(areas, 1))
    sel = keep[owner]
    owner, pix = owner[sel], pix[sel]
    rows, cols = pix // w, pix % w
    n = len(flat)
    cnt = np.maximum(np.bincount(owner, minlength=n), 1)
    cy = np.bincount(owner, weights=rows, minlength=n) / cnt
    cx = np.bincount(owner, weights=cols, minlength=n) / cnt
    d2 = (rows - cy[owner]) ** 2 + (cols - cx[owner]) ** 2
    order = np.lexsort((owner, d2, pix))  # by pixel, then distance, then object index
    pix_o = pix[order]
    first = np.ones(len(pix_o), bool)
    first[1:] = pix_o[1:] != pix_o[:-1]
    labels = np.zeros(h * w, np.int64)
    labels[pix_o[first]] = owner[order][first] + 1
    return relabel_consecutive(labels.reshape(shape))


def validate_labels(labels: np.ndarray) -> None:
    """Raise ValueError unless `labels` is a 2-D non-negative integer image with ids 1..N consecutive."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer, got {labels.dtype}")
    ids = fastremap.unique(labels)
    ids = ids[ids != 0]
    if ids.size and (ids.min() < 1 or ids.max() != ids.size):
        raise ValueError(f"ids are not consecutive 1..N (found {ids.size} ids, max {ids.max()})")
