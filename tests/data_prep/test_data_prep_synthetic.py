"""Synthetic cells, time-lapse crops and subimages."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import label_squares
from scipy import ndimage

from data_prep.canonical import CanonicalDataset, write_example, write_index
from data_prep.labels import median_diameter, validate_labels
from data_prep.subimages import make_subimages, tile_starts
from data_prep.synthetic import SyntheticConfig, synthesize, write_synthetic_dataset
from data_prep.timelapse import timelapse_crops


def _touching_pairs(lab: np.ndarray) -> int:
    pairs = set()
    for a, b in ((lab[:-1], lab[1:]), (lab[:, :-1], lab[:, 1:])):
        sel = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(a[sel].tolist(), b[sel].tolist(), strict=True))
    return len({tuple(sorted(p)) for p in pairs})


def test_deterministic_in_seed():
    cfg = SyntheticConfig(shape=(128, 128))
    a, la = synthesize(cfg, seed=3)
    b, lb = synthesize(cfg, seed=3)
    c, lc = synthesize(cfg, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(la, lc)


@pytest.mark.parametrize("diameter", [20.0, 30.0, 40.0])
def test_cell_size_configurable_and_masks_valid(diameter):
    img, lab = synthesize(SyntheticConfig(shape=(320, 320), diameter=diameter), seed=1)
    validate_labels(lab)
    assert lab.dtype == np.uint16 and img.dtype == np.uint16 and img.shape == lab.shape
    assert abs(median_diameter(lab) - diameter) < 0.2 * diameter
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):  # every object is one piece
        assert ndimage.label(lab[sl] == i)[1] == 1
    assert _touching_pairs(lab) >= 0.2 * lab.max()  # crowded: many cells touch a neighbour


def test_fluorescence_and_phase_contrast_look():
    cfg = SyntheticConfig(shape=(256, 256), diameter=30)
    img, lab = synthesize(cfg, seed=5)
    fg, bg = lab > 0, ndimage.binary_dilation(lab > 0, iterations=6) == 0
    assert img[fg].mean() > 1.5 * img[bg].mean()  # bright cells on a dark background
    assert img[bg].std() > 2  # shot + read noise
    ph, lab2 = synthesize(SyntheticConfig(shape=(256, 256), diameter=30, modality="phase"), seed=5)
    np.testing.assert_array_equal(lab, lab2)  # same geometry for the same seed
    assert ph.dtype == np.uint8
    ring = ndimage.binary_dilation(fg, iterations=3) & ~fg  # bright halo just outside cells
    interior = ndimage.binary_erosion(fg, iterations=3)
    assert ph[interior].mean() < ph[bg].mean() < ph[ring].mean()
    two, _ = synthesize(SyntheticConfig(shape=(128, 128), nuclear_channel=True), seed=0)
    assert two.shape == (2, 128, 128)


def test_write_synthetic_dataset(tmp_path):
    rows = write_synthetic_dataset(tmp_path, 3, SyntheticConfig(shape=(96, 96), diameter=24), seed=7)
    ds = CanonicalDataset(tmp_path)
    assert len(ds) == 3 == len(rows) and all(r.dataset == "synthetic_fluorescence" for r in ds)
    assert all(r.n_objects > 3 and 15 < r.median_diameter < 33 for r in ds)
    write_synthetic_dataset(tmp_path, 2, SyntheticConfig(shape=(96, 96), modality="phase"), seed=7, split="test")
    assert len(CanonicalDataset(tmp_path)) == 5 and len(CanonicalDataset(tmp_path, split="test")) == 2


def test_timelapse_crops_with_masks(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.integers(1, 1000, (12, 150, 160), dtype=np.uint16)
    masks = np.zeros((12, 150, 160), np.uint16)
    masks[:, 40:90, 40:90] = 3
    tifffile.imwrite(tmp_path / "movie.tif", stack)
    tifffile.imwrite(tmp_path / "movie_masks.tif", masks)
    out = tmp_path / "crops"
    rows = timelapse_crops([tmp_path / "movie.tif"], out, masks=[tmp_path / "movie_masks.tif"], seed=1)
    assert len(rows) == 5
    ds = CanonicalDataset(out)
    frames = set()
    for i, row in enumerate(ds):
        img = ds.image(i)
        assert img.shape == (104, 104) and ds.mask(i).shape == (104, 104)
        assert not img[:2].any() and not img[-2:].any() and not img[:, :2].any() and not img[:, -2:].any()
        t, y, x = (
            int(v)
            for v in (
                row.name.split("_t")[1].split("_")[0],
                row.name.split("_y")[1].split("_")[0],
                row.name.split("_x")[1],
            )
        )
        frames.add(t)
        np.testing.assert_array_equal(img[2:-2, 2:-2], stack[t, y : y + 100, x : x + 100])
        assert ds.mask(i).max() <= 1
    assert len(frames) == 5  # five distinct random frames
    again = tmp_path / "again"
    timelapse_crops([tmp_path / "movie.tif"], again, masks=[tmp_path / "movie_masks.tif"], seed=1)
    assert sorted(p.name for p in (again / "images").iterdir()) == sorted(p.name for p in (out / "images").iterdir())


def test_timelapse_without_masks_writes_images_to_annotate(tmp_path):
    stack = np.ones((3, 2, 64, 64), np.uint8)  # (T, C, H, W), fewer frames than requested
    tifffile.imwrite(tmp_path / "m.tif", stack, photometric="minisblack")
    paths = timelapse_crops([tmp_path / "m.tif"], tmp_path / "todo", frames=5, crop=32, border=2)
    assert len(paths) == 3 and tifffile.imread(paths[0]).shape == (2, 36, 36)
    with pytest.raises(ValueError, match="larger than the frame"):
        timelapse_crops([tmp_path / "m.tif"], tmp_path / "x", crop=100)


def _big_example(tmp_path):
    lab = label_squares((200, 300), [(20, 20), (20, 150), (120, 60), (150, 250), (100, 140)], side=30)
    img = np.random.default_rng(0).integers(0, 255, (3, 200, 300), dtype=np.uint8)
    root = tmp_path / "big"
    write_index(root, [write_example(root, "big", img, lab, dataset="d", split="val", license="x", source="s")])
    return root, img, lab


def test_subimages_tiles(tmp_path):
    root, img, lab = _big_example(tmp_path)
    assert tile_starts(300, 128, 128) == [0, 128, 172] and tile_starts(100, 128, 128) == [0]
    rows = make_subimages(root, tmp_path / "tiles", size=128, min_objects=1)
    ds = CanonicalDataset(tmp_path / "tiles")
    assert len(ds) == len(rows) and all(r.split == "val" and r.height == r.width == 128 for r in ds)
    for i, row in enumerate(ds):
        y, x = int(row.name.split("_y")[1].split("_")[0]), int(row.name.split("_x")[1])
        np.testing.assert_array_equal(ds.image(i), img[:, y : y + 128, x : x + 128])
        np.testing.assert_array_equal(ds.mask(i) > 0, lab[y : y + 128, x : x + 128] > 0)


def test_subimages_per_cell(tmp_path):
    root, img, lab = _big_example(tmp_path)
    make_subimages(root, tmp_path / "cells", mode="cells", context=2.0)
    ds = CanonicalDataset(tmp_path / "cells")
    assert len(ds) == 5
    for i, row in enumerate(ds):
        k = int(row.name.split("cell")[1])
        assert row.height == row.width == 60
        src = row.source  # big[y=a:b, x=c:d]
        y0 = int(src.split("y=")[1].split(":")[0])
        x0 = int(src.split("x=")[1].split(":")[0])
        window = lab[y0 : y0 + 60, x0 : x0 + 60]
        assert (window == k).sum() == 900  # the whole cell is inside its window
        np.testing.assert_array_equal(ds.mask(i) > 0, window > 0)


@pytest.mark.slow
@pytest.mark.parametrize(("modality", "min_ap50"), [("fluorescence", 0.9), ("phase", 0.75)])
def test_classic_cyto_network_segments_synthetic_cells(modality, min_ap50, cyto0_file):
    """The demo's premise: Cellpose's 2020 cyto net finds the synthetic cells (measured on 3 images
    each at diameter 30 px: AP@0.5 0.95 fluorescence, 0.86 phase)."""
    from cpsam.metrics import average_precision
    from cpsam.models.loading import load_model
    from cpsam.segment import Segmenter

    model = load_model(cyto0_file)
    pairs = [
        synthesize(SyntheticConfig(shape=(256, 256), diameter=30, modality=modality), seed=100 + s) for s in range(2)
    ]
    res = Segmenter(model, device="cpu").segment([p[0] for p in pairs], diameter=30, channels=[0, 0])
    ap, _, _, _ = average_precision([p[1] for p in pairs], [r.masks for r in res], thresholds=[0.5])
    assert ap.mean() > min_ap50
