"""Label algebra of data_prep: relabelling, diameters (vs cellpose), rasterising, overlaps, splitting."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellpose.utils import diameters as cp_diameters
from conftest import shared_path

from data_prep.labels import (
    median_diameter,
    merge_instance_channels,
    polygon_pixels,
    rasterize_polygons,
    relabel_consecutive,
    resolve_overlaps,
    semantic_to_instances,
    split_components,
    split_disconnected,
    validate_labels,
)


def test_relabel_keeps_order_and_identity():
    lab = np.array([[0, 7, 7], [3, 0, 9]])
    out = relabel_consecutive(lab)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3]])
    already = np.array([[2, 1], [0, 3]], np.uint16)
    np.testing.assert_array_equal(relabel_consecutive(already), already)
    big = np.arange(70000, dtype=np.int64).reshape(280, 250)
    assert relabel_consecutive(big * 2).dtype == np.uint32


@pytest.mark.parametrize("folder", ["phase_ctc_U373", "fluo_nuclei_deepcell2016", "he_miccai2015_cpm"])
def test_median_diameter_matches_cellpose(folder):
    for path in sorted(shared_path("data", folder).glob("*_masks.tif"))[:2]:
        masks = tifffile.imread(path)
        assert median_diameter(masks) == pytest.approx(cp_diameters(masks)[0], rel=1e-9)


def test_rasterize_first_polygon_kept_and_small_on_top():
    big = np.array([[2, 2], [30, 2], [30, 30], [2, 30]], float)
    small = np.array([[10, 10], [16, 10], [16, 16], [10, 16]], float)
    lab = rasterize_polygons([big, small], (40, 40))
    assert lab.max() == 2
    assert lab[5, 5] == 1  # the FIRST polygon is id 1, not background
    assert lab[13, 13] == 2  # the smaller one stays visible on top of the larger
    lab_given = rasterize_polygons([small, big], (40, 40), order="given")
    assert lab_given.max() == 1  # painted in list order the big one hides the small
    # polygons reaching outside the image are clipped, 2-vertex regions skipped
    lab = rasterize_polygons(
        [np.array([[-5, -5], [8, -5], [8, 8], [-5, 8]]), np.array([[1, 1], [3, 3]])], (20, 20)
    )
    assert lab.max() == 1 and lab[0, 0] == 1 and lab[9, 9] == 0


def test_resolve_overlaps_drop_and_nearest_centroid():
    shape = (40, 40)
    a = np.zeros(shape, bool)
    a[5:20, 5:20] = True
    b = np.zeros(shape, bool)
    b[5:20, 15:30] = True  # overlaps a in columns 15..19
    c = np.zeros(shape, bool)
    c[6:9, 6:9] = True  # fully inside a -> >= 75 % overlapped -> dropped
    lab = resolve_overlaps([a, b, c], shape)
    assert lab.max() == 2
    # overlap columns 15,16,17 are nearer a's centroid (x=12) than b's (x=22)? 15-12=3 < 22-15=7
    assert lab[10, 15] == 1 and lab[10, 16] == 1 and lab[10, 17] == 1
    assert lab[10, 18] == 2 and lab[10, 19] == 2  # 18: 6 vs 4 -> b
    # sparse input (flat indices) gives the same result
    lab2 = resolve_overlaps([np.flatnonzero(a), np.flatnonzero(b), np.flatnonzero(c)], shape)
    np.testing.assert_array_equal(lab, lab2)


def test_polygon_pixels_matches_dense_rasteriser():
    poly = np.array([[3.2, 4.1], [20.7, 6.0], [15.0, 25.3], [2.0, 18.0]])
    dense = rasterize_polygons([poly], (30, 30)) > 0
    np.testing.assert_array_equal(np.flatnonzero(dense), polygon_pixels(poly, (30, 30)))


def test_split_components_graph_colouring():
    # two colours, each used by two separate blobs; blobs of different colour touch
    col = np.zeros((10, 20), np.uint8)
    col[2:5, 2:5] = 1
    col[2:5, 5:8] = 2  # touches the first blob
    col[6:9, 12:15] = 1
    col[6:9, 16:19] = 2
    lab = split_components(col)
    assert lab.max() == 4
    validate_labels(lab)
    assert lab[3, 4] != lab[3, 5]


def test_semantic_and_merge():
    sem = np.zeros((10, 10), np.uint8)
    sem[1:3, 1:3] = 255
    sem[6:9, 6:9] = 255
    assert semantic_to_instances(sem).max() == 2
    a = np.zeros((6, 6), int)
    a[0:2, 0:2] = 1
    b = np.zeros((6, 6), int)
    b[4:6, 4:6] = 1  # same id 1 in another channel: must stay a distinct object
    merged = merge_instance_channels([a, b])
    assert merged.max() == 2 and merged[0, 0] != merged[5, 5]


def test_validate_labels_rejects_gaps():
    with pytest.raises(ValueError, match="consecutive"):
        validate_labels(np.array([[0, 1], [3, 3]]))


def test_split_disconnected_keeps_small_fragments():
    lab = np.zeros((20, 30), np.int32)
    lab[2:8, 2:8] = 1  # 36 px
    lab[2:8, 20:26] = 1  # same id, another cell of the same size (ncolor) -> split
    lab[15, 15] = 1  # a 1-px stray fragment -> keeps id 1
    lab[12:16, 2:6] = 2
    out = split_disconnected(lab)
    assert out.max() == 3
    assert out[3, 3] == 1 and out[15, 15] == 1 and out[13, 3] == 2 and out[3, 21] == 3
