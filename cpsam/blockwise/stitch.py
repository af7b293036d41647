"""Labels of overlapping blocks -> one label image with ids 1..N.

The rule (pure functions on numpy arrays; `cpsam.blockwise.run` applies them block by block):

1. Each block is segmented on its outer rectangle (core + halo, `cpsam.blockwise.blocks`); every pixel of the
   final image takes the label its own block (the one whose core holds it) gave it. No pixel is ever claimed by
   two blocks, so there are no painting conflicts; an object crossing a seam is cut into the parts each core
   shows.
2. Two touching blocks both segmented the rectangle their outer rectangles share. An object of block A and
   one of block B are the same object when their masks in that rectangle overlap with IoU >= 0.5
   (`match_labels`); an object crossing the seam lies wholly in the shared rectangle (the halo is at least two
   diameters), so the IoU compares the two blocks' complete versions of it. The matches are edges of a graph
   over all blocks' labels; its connected components (scipy.sparse.csgraph) are the final objects: the parts
   of an object cut by a seam get one id, and an object two blocks both found (a duplicate) is kept once.
3. The components that show up in some core are numbered 1..N in raster order of first appearance (block
   order, then the block's label order), so ids are consecutive and the numbering is deterministic
   (`relabel_tables`).

Unlike cellpose's contrib/distributed_segmentation.py, which merges labels that touch across a block face,
two different cells that merely touch at a seam are not merged: only the two blocks' versions of one cell
overlap with IoU >= 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

MIN_MATCH_IOU = 0.5


def core_labels(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct non-zero labels of a core crop (int64)."""
    found = np.unique(labels)
    return found[found > 0].astype(np.int64)


def match_labels(a: np.ndarray, b: np.ndarray, min_iou: float = MIN_MATCH_IOU) -> np.ndarray:
    """Pairs (label in a, label in b) that are the same object: IoU >= min_iou within these arrays.

    a, b: the two blocks' labels over the same rectangle (same shape, 0 = background).
    Returns an (n, 2) int64 array, sorted.
    """
    if a.shape != b.shape:
        raise ValueError(f"match_labels: shapes differ {a.shape} != {b.shape}")
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    pairs, inter = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    area_a = np.bincount(a, minlength=int(pairs[:, 0].max()) + 1)
    area_b = np.bincount(b, minlength=int(pairs[:, 1].max()) + 1)
    iou = inter / (area_a[pairs[:, 0]] + area_b[pairs[:, 1]] - inter)
    return pairs[iou >= min_iou]


def relabel_tables(
    n_labels: Sequence[int],
    present: Sequence[np.ndarray],
    matches: Sequence[tuple[int, int, np.ndarray]],
) -> tuple[list[np.ndarray], int]:
    """Per block a lookup table local label -> final id, and N (the number of final objects).

    n_labels[k]: the largest local label of block k (labels 1..n_labels[k]); present[k]: the local labels that
    appear in block k's core; matches: (k, j, pairs) with pairs from `match_labels` (labels of block k, of
    block j). Table k has n_labels[k] + 1 uint32 entries (entry 0 = 0); a label that shows in no core and is
    matched to none that does maps to 0. Final ids are 1..N consecutive (module docstring, rule 3).
    """
    counts = np.asarray(n_labels, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_nodes = int(offsets[-1])
    if n_nodes == 0:
        return [np.zeros(int(n) + 1, np.uint32) for n in counts], 0
    rows = [offsets[k] + pairs[:, 0] - 1 for k, _, pairs in matches if len(pairs)]
    cols = [offsets[j] + pairs[:, 1] - 1 for _, j, pairs in matches if len(pairs)]
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(row), np.int8), (row, col)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph.tocsr(), directed=False)
    shown = np.concatenate([offsets[k] + np.asarray(p, np.int64) - 1 for k, p in enumerate(present)] or
                           [np.zeros(0, np.int64)])
    final = np.zeros(int(component.max()) + 1, np.uint32)
    if len(shown):
        comps, first = np.unique(component[shown], return_index=True)
        final[comps[np.argsort(first)]] = np.arange(1, len(comps) + 1, dtype=np.uint32)
    tables = []
    for k, n in enumerate(counts):
        table = np.zeros(int(n) + 1, np.uint32)
        table[1:] = final[component[offsets[k] : offsets[k] + n]]
        tables.append(table)
    return tables, int(final.max())
