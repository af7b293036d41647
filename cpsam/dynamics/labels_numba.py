"""Label bookkeeping of the masks' tail in single passes (numba): counts, renumbering, hole filling.

Kernels behind `cpsam.dynamics.get_masks` and `fill_holes_and_remove_small_masks` (the public
API is there). Each replaces a whole-image library call of the reference with one pass that gives
the same labels:

* `label_counts`: the pixel count of every label value (`fastremap.unique(..., return_counts=True)`
  for labels 0..n);
* `renumber_kept`: drops the labels not kept and renumbers the rest 1..k in order of first
  appearance in row-major order, which is `fastremap.mask` followed by `fastremap.renumber`
  (zero preserved);
* `fill_holes_in_order`: cellpose's loop `for each label i in order: view = masks[bbox_i];
  view[fill_voids.fill(view == i)] = i` with the boxes of `scipy.ndimage.find_objects` taken
  before the loop, so a label whose hole holds another label absorbs it, and a label absorbed
  earlier fills what is left of it. A hole is a set of pixels of the box that are not the label
  and are not 4-connected through such pixels to the box's border (fill_voids' 2-D rule).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def label_counts(flat: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,) int64 pixel count of each value 0..n in the 1-D integer labels `flat` (all <= n)."""
    counts = np.zeros(n + 1, np.int64)
    fg = 0
    for v in flat:  # background pixels are counted at the end, not by one hot counter
        if v != 0:
            counts[v] += 1
            fg += 1
    counts[0] = flat.shape[0] - fg
    return counts


@njit(cache=True, nogil=True)
def renumber_kept(flat: np.ndarray, keep: np.ndarray) -> int:
    """In place: labels l with keep[l] False become 0, the others 1..k by first appearance; returns k.

    flat: 1-D integer labels with values < len(keep); 0 stays 0 whatever keep[0] says.
    """
    new = np.zeros(keep.shape[0], flat.dtype)
    k = 0
    for i in range(flat.shape[0]):
        v = flat[i]
        if v == 0:
            continue
        if not keep[v]:
            flat[i] = 0
            continue
        if new[v] == 0:
            k += 1
            new[v] = k
        flat[i] = new[v]
    return k


@njit(cache=True, nogil=True)
def apply_table(flat: np.ndarray, table: np.ndarray) -> None:
    """In place: flat[i] = table[flat[i]] (1-D labels, values < len(table))."""
    for i in range(flat.shape[0]):
        flat[i] = table[flat[i]]


@njit(cache=True, nogil=True)
def _boxes(m: np.ndarray, n: int) -> np.ndarray:
    """(n + 1, 4) int64 [y0, y1, x0, x1) boxes of labels 0..n (empty box: y1 <= y0)."""
    box = np.empty((n + 1, 4), np.int64)
    box[:, 0] = m.shape[0]
    box[:, 1] = 0
    box[:, 2] = m.shape[1]
    box[:, 3] = 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            if v > 0:
                box[v, 0] = min(box[v, 0], i)
                box[v, 1] = max(box[v, 1], i + 1)
                box[v, 2] = min(box[v, 2], j)
                box[v, 3] = max(box[v, 3], j + 1)
    return box


@njit(cache=True, nogil=True)
def fill_holes_in_order(m: np.ndarray, n: int) -> None:
    """In place: fill the holes of labels 1..n of (H, W) labels `m`, label by label (module doc)."""
    box = _boxes(m, n)
    area = 0
    for v in range(1, n + 1):
        area = max(area, (box[v, 1] - box[v, 0]) * (box[v, 3] - box[v, 2]))
    seen = np.zeros(area, np.uint8)  # reached from the border, per box pixel
    stack = np.empty(area, np.int64)
    for v in range(1, n + 1):
        y0, y1, x0, x1 = box[v, 0], box[v, 1], box[v, 2], box[v, 3]
        hh = y1 - y0
        ww = x1 - x0
        if hh <= 0 or ww <= 0:
            continue
        seen[: hh * ww] = 0
        top = 0
        for i in range(hh):  # every border pixel that is not the label seeds the outside
            for j in range(ww):
                if (i == 0 or i == hh - 1 or j == 0 or j == ww - 1) and m[y0 + i, x0 + j] != v:
                    seen[i * ww + j] = 1
                    stack[top] = i * ww + j
                    top += 1
        while top > 0:
            top -= 1
            p = stack[top]
            i = p // ww
            j = p - i * ww
            if i > 0 and seen[p - ww] == 0 and m[y0 + i - 1, x0 + j] != v:
                seen[p - ww] = 1
                stack[top] = p - ww
                top += 1
            if i < hh - 1 and seen[p + ww] == 0 and m[y0 + i + 1, x0 + j] != v:
                seen[p + ww] = 1
                stack[top] = p + ww
                top += 1
            if j > 0 and seen[p - 1] == 0 and m[y0 + i, x0 + j - 1] != v:
                seen[p - 1] = 1
                stack[top] = p - 1
                top += 1
            if j < ww - 1 and seen[p + 1] == 0 and m[y0 + i, x0 + j + 1] != v:
                seen[p + 1] = 1
                stack[top] = p + 1
                top += 1
        for i in range(hh):
            for j in range(ww):
                if seen[i * ww + j] == 0:
                    m[y0 + i, x0 + j] = v
