"""The single-pass label kernels of the masks' tail (`cpsam.dynamics.labels_numba`) against the
library calls of the reference they replace.

`fill_holes_and_remove_small_masks` must give, label for label, what cellpose's loop gives with
fastremap (counts, mask, renumber), scipy's find_objects and fill_voids: written out below as the
reference, under both rule sets, with holes, masks inside other masks' holes, touching masks,
labels with gaps, sparse label values, no background pixel, min_size 0 / -1 / 15.
"""

from __future__ import annotations

import fastremap
import fill_voids
import numpy as np
import pytest
from scipy.ndimage import find_objects

from cpsam import dynamics
from cpsam.dynamics import labels_numba


def _reference(masks: np.ndarray, min_size: int, rules: str) -> np.ndarray:
    """cellpose's fill_holes_and_remove_small_masks with the library calls (cp4: by label value;
    cp3: cellpose 3's rank rule)."""
    masks = masks.copy()

    def drop_small(m: np.ndarray) -> np.ndarray:
        uniq, counts = fastremap.unique(m, return_counts=True)
        if rules == "cp3":
            small = np.nonzero(counts[1:] < min_size)[0] + 1
        else:
            small = uniq[uniq != 0][counts[uniq != 0] < min_size]
        if len(small):
            m = fastremap.mask(m, small)
        fastremap.renumber(m, in_place=True)
        return m

    if min_size > 0:
        masks = drop_small(masks)
    j = 0
    for i, slc in enumerate(find_objects(masks)):
        if slc is None:
            continue
        j += 1
        view = masks[slc]
        view[fill_voids.fill(view == (i + 1))] = j
    if min_size > 0:
        masks = drop_small(masks)
    return masks


def _ring(m: np.ndarray, y: int, x: int, r: int, label: int) -> None:
    yy, xx = np.ogrid[: m.shape[0], : m.shape[1]]
    d = np.hypot(yy - y, xx - x)
    m[(d <= r) & (d > r - 2)] = label


def _scene(seed: int, dtype) -> np.ndarray:
    """Blobs, rings with holes, masks inside holes, tiny masks, random label values with gaps."""
    rng = np.random.default_rng(seed)
    m = np.zeros((96, 128), np.int64)
    for _ in range(25):
        y, x = rng.integers(0, 96), rng.integers(0, 128)
        h, w = rng.integers(1, 14, size=2)
        m[y : y + h, x : x + w] = rng.integers(1, 60)
    for _ in range(4):
        y, x, r = rng.integers(12, 84), rng.integers(12, 116), rng.integers(5, 12)
        _ring(m, y, x, r, rng.integers(1, 60))
        m[y, x] = rng.integers(1, 60)  # a one-pixel mask inside the hole
        m[y - 1 : y + 2, x + 2 : x + 4] = rng.integers(1, 60)
    m[rng.random(m.shape) < 0.01] = 0  # pinholes
    return m.astype(dtype)


@pytest.mark.parametrize("rules", ["cp4", "cp3"])
@pytest.mark.parametrize("min_size", [15, 4, 0, -1])
@pytest.mark.parametrize("seed", range(6))
def test_fill_and_size_filter_equal_the_library_loop(rules: str, min_size: int, seed: int) -> None:
    for dtype in (np.uint16, np.uint32, np.int32):
        m = _scene(seed, dtype)
        got = dynamics.fill_holes_and_remove_small_masks(m, min_size=min_size, rules=rules)
        assert got.dtype == m.dtype
        np.testing.assert_array_equal(got, _reference(m, min_size, rules))


@pytest.mark.parametrize("rules", ["cp4", "cp3"])
def test_sparse_values_and_no_background(rules: str) -> None:
    m = _scene(7, np.uint32)
    sparse = np.where(m > 0, m.astype(np.uint64) * 70_000_001 % 4_000_000_000 + 1, 0).astype(np.uint32)
    assert sparse.max() > sparse.size
    np.testing.assert_array_equal(dynamics.fill_holes_and_remove_small_masks(sparse, 15, rules=rules),
                                  _reference(sparse, 15, rules))
    # min_size 0: the reference's find_objects cannot allocate 4e9 slices; its loop numbers the
    # labels in value order, so it is the reference on the labels compacted in value order
    compact = np.unique(sparse, return_inverse=True)[1].reshape(sparse.shape).astype(np.uint32)
    np.testing.assert_array_equal(dynamics.fill_holes_and_remove_small_masks(sparse, 0, rules=rules),
                                  _reference(compact, 0, rules))
    full = m + 1  # no background pixel: label 1 plays the background's part in the rank rule
    for min_size in (15, 0):
        np.testing.assert_array_equal(dynamics.fill_holes_and_remove_small_masks(full, min_size, rules=rules),
                                      _reference(full, min_size, rules))


def test_a_mask_in_a_hole_is_absorbed_and_a_diagonal_gap_is_a_hole() -> None:
    m = np.zeros((9, 9), np.uint16)
    m[1:8, 1:8] = 1
    m[3:6, 3:6] = 2  # inside 1's hole: absorbed
    m[6, 6] = 0  # background touching the hole only diagonally: 4-connectivity makes it a hole
    got = dynamics.fill_holes_and_remove_small_masks(m, min_size=0)
    assert (got[1:8, 1:8] == 1).all() and got.max() == 1
    np.testing.assert_array_equal(got, _reference(m, 0, "cp4"))


def test_renumber_kept_is_mask_then_renumber() -> None:
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 50, 5000).astype(np.uint32)
    keep = rng.random(50) < 0.7
    want = fastremap.renumber(fastremap.mask(flat.copy(), np.nonzero(~keep)[0]), in_place=False)[0]
    got = flat.copy()
    n = labels_numba.renumber_kept(got, keep)
    np.testing.assert_array_equal(got, want)
    assert n == int(want.max())
