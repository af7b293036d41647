"""train/augment.py against cellpose 4.2.1.1's random_rotate_and_resize and on real annotated images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from cellpose import train as cp_train
from cellpose import transforms as cp_transforms
from conftest import read_shared_pair
from omegaconf import OmegaConf
from scipy import ndimage as ndi

from cpsam.dynamics import masks_to_flows
from train import augment as A

HELA = ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_02_t075")  # (700, 1100) uint16 nuclei
NIH3T3 = ("phase_usiigaci_3t3", "usiigaci_set1")  # (1022, 1024) uint16 phase, whole cells
TISSUE = ("tissue_multiplex_neurips22", "neurips22_cell_00849")  # (512, 512, 3) uint8, R empty


@pytest.fixture(scope="module")
def examples() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Non-square real regions (raw image, masks, unit flows): HeLa 300x400 and 3T3 400x300."""
    torch.set_num_threads(1)
    out = {}
    for key, pair, cut in (("hela", HELA, np.s_[100:400, 200:600]), ("3t3", NIH3T3, np.s_[300:700, 350:650])):
        img, masks = read_shared_pair(*pair)
        img, masks = img[cut], masks[cut]
        out[key] = (img, masks, masks_to_flows(masks))
    return out


def interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is one object that does not touch the crop border."""
    same = (ndi.minimum_filter(labels, 3) == labels) & (ndi.maximum_filter(labels, 3) == labels) & (labels > 0)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return same & ~np.isin(labels, border)


def cellpose_seeds(n: int) -> list[int]:
    """The first n seeds that make cellpose flip and the first n that do not (draw 3 is the flip)."""
    flips, keeps = [], []
    for seed in range(100):
        np.random.seed(seed)
        (flips if np.random.rand(5)[2] > 0.5 else keeps).append(seed)
    return flips[:n] + keeps[:n]


@pytest.mark.parametrize("key", ["hela", "3t3"])
@pytest.mark.parametrize("scale_range,diameter,tile", [(0.5, None, 256), (None, None, 256), (None, 20.0, 224)])
def test_warp_equals_cellpose_random_rotate_and_resize(examples, key, scale_range, diameter, tile) -> None:
    img, masks, flows = examples[key]
    norm = A.normalize_image(img)
    image = np.concatenate([norm, norm**2, np.zeros_like(norm)])  # 3 distinct channels, one empty
    labels = np.concatenate([(masks > 0)[None].astype(np.float32), flows])
    cfg = A.AugmentConfig(scale_mode="range" if scale_range else "log2", rescale_to_diam_mean=diameter is not None)
    rescale = np.array([diameter / cfg.diam_mean if diameter else 1.0], np.float32)
    swapped = 0
    for seed in cellpose_seeds(2):
        np.random.seed(seed)
        geometry = A.geometry_from_uniforms(np.random.rand(5), masks.shape, tile, cfg, diameter)
        np.random.seed(seed)  # cellpose draws scale, angle, flip, then the two offsets
        theirs_img, theirs_lbl, _ = cp_transforms.random_rotate_and_resize(
            [image], [labels], scale_range=scale_range, bsize=tile, rescale=rescale
        )
        ours = A.warp(image, masks, flows, geometry, tile)
        for mine, ref in ((ours.image, theirs_img[0].numpy()), (ours.target, theirs_lbl[0].numpy())):
            assert mine.shape == ref.shape and mine.dtype == np.float32
            np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-4 * float(ref.max() - ref.min()))
        swapped += abs(geometry.offset_y) != abs(geometry.offset_x)
    assert scale_range == 0.5 or swapped  # the (y, x) -> (x, y) offset quirk was exercised


def test_swapped_offsets_flag() -> None:
    u = np.array([0.9, 0.3, 0.2, 0.8, 0.1])
    quirk = A.geometry_from_uniforms(u, (300, 400), 256, A.AugmentConfig())
    own = A.geometry_from_uniforms(u, (300, 400), 256, A.AugmentConfig(cellpose_offsets=False))
    scale = 0.75 + 0.5 * 0.9
    slack_y, slack_x = 300 * scale - 256, 400 * scale - 256
    assert own.offset_y == pytest.approx(slack_y * 0.8 - slack_y / 2, abs=1e-4)
    assert own.offset_x == pytest.approx(slack_x * 0.1 - slack_x / 2, abs=1e-4)
    assert (quirk.offset_x, quirk.offset_y) == (own.offset_y, own.offset_x)
    # with correct offsets the crop never leaves the scaled image along either axis
    assert abs(own.offset_y) <= slack_y / 2 and abs(own.offset_x) <= slack_x / 2


@pytest.mark.parametrize("key", ["hela", "3t3"])
@pytest.mark.parametrize("mode", ["range", "log2"])
def test_warped_flows_agree_with_flows_of_warped_masks(examples, key, mode) -> None:
    img, masks, flows = examples[key]
    cfg = A.AugmentConfig(scale_mode=mode)
    medians = []
    for seed in range(4):
        crop = A.augment_example(img, masks, flows, np.random.default_rng(seed), cfg, 256)
        exact = A.augment_example(img, masks, None, np.random.default_rng(seed), A.AugmentConfig(
            scale_mode=mode, target_mode="recompute"), 256)
        np.testing.assert_array_equal(crop.masks, exact.masks)  # same draws -> same geometry
        np.testing.assert_array_equal(exact.target[1:], masks_to_flows(exact.masks))
        np.testing.assert_array_equal(exact.target[0], exact.masks > 0)
        inside = interior(crop.masks)
        if inside.sum() >= 200:
            cosine = (crop.target[1:] * exact.target[1:]).sum(axis=0)[inside]
            medians.append(float(np.median(cosine)))
    assert len(medians) >= 2 and min(medians) >= 0.97, medians


def test_window_warp_equals_full_warp(examples) -> None:
    img, masks, flows = examples["hela"]
    image = A.normalize_image(img)
    ignore = masks == masks[150, 200] if masks[150, 200] else masks == np.unique(masks)[5]
    rng = np.random.default_rng(3)
    for cfg in (A.AugmentConfig(), A.AugmentConfig(scale_mode="log2"), A.AugmentConfig(rotate=False)):
        for _ in range(3):
            geometry = A.draw_geometry(rng, masks.shape, 256, cfg)
            full = A.warp(image, masks, flows, geometry, 256, ignore=ignore)
            y0, y1, x0, x1 = A.source_window(geometry, masks.shape, 256, margin=0)
            # pixels outside the margin-0 window must not influence the crop at all
            poisoned = np.full_like(image, np.nan)
            poisoned[:, y0:y1, x0:x1] = image[:, y0:y1, x0:x1]
            assert np.isfinite(A.warp(poisoned, masks, flows, geometry, 256).image).all()
            for margin in (2, 9):
                y0, y1, x0, x1 = A.source_window(geometry, masks.shape, 256, margin=margin)
                part = A.warp(image[:, y0:y1, x0:x1], masks[y0:y1, x0:x1], flows[:, y0:y1, x0:x1], geometry, 256,
                              ignore=ignore[y0:y1, x0:x1], origin=(y0, x0), src_hw=masks.shape)
                np.testing.assert_allclose(part.image, full.image, rtol=0, atol=1e-5)
                np.testing.assert_allclose(part.target, full.target, rtol=0, atol=1e-5)
                np.testing.assert_array_equal(part.masks, full.masks)
                np.testing.assert_array_equal(part.valid, full.valid)
    y0, y1, x0, x1 = A.source_window(geometry, masks.shape, 256)
    with pytest.raises(ValueError, match="does not contain"):
        A.warp(image[:, y0 + 1 : y1, x0:x1], masks[y0 + 1 : y1, x0:x1], None, geometry, 256,
               origin=(y0 + 1, x0), src_hw=masks.shape)


def test_valid_map_and_labels(examples) -> None:
    img, masks, flows = examples["3t3"]
    target_label = int(np.bincount(masks.ravel())[1:].argmax()) + 1
    ignored = 0
    for seed in range(3):
        crop = A.augment_example(img, masks, flows, np.random.default_rng(seed), A.AugmentConfig.paper(), 256,
                                 diameter=60.0, ignore=masks == target_label)
        assert crop.masks.dtype == np.int32 and crop.valid.dtype == np.float32
        assert set(np.unique(crop.masks)) <= set(np.unique(masks))  # nearest: no invented ids
        np.testing.assert_array_equal(crop.valid == 0, crop.masks == target_label)  # padding stays valid
        ignored += int((crop.valid == 0).sum())
    assert ignored > 0


def test_augment_example_reads_only_the_window_of_a_memmap(examples, tmp_path) -> None:
    img, masks, flows = examples["hela"]
    tifffile.imwrite(tmp_path / "img.tif", img)
    lazy = tifffile.memmap(tmp_path / "img.tif")
    bounds = A.percentile_bounds_per_channel(img)
    cfg = A.AugmentConfig.paper()
    a = A.augment_example(lazy, masks, flows, np.random.default_rng(5), cfg, 224, 26.0, bounds=bounds, n_channels=3)
    b = A.augment_example(img, masks, flows, np.random.default_rng(5), cfg, 224, 26.0, n_channels=3)
    assert a.image.shape == (3, 224, 224) and a.target.shape == (3, 224, 224)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.target, b.target)


def test_determinism(examples) -> None:
    img, masks, flows = examples["3t3"]
    cfg = A.AugmentConfig.paper()
    runs = [A.augment_example(img, masks, flows, np.random.default_rng(s), cfg, 256, 60.0, n_channels=3)
            for s in (11, 11, 12)]
    for field in ("image", "target", "masks", "valid"):
        np.testing.assert_array_equal(getattr(runs[0], field), getattr(runs[1], field))
    assert runs[0].geometry == runs[1].geometry != runs[2].geometry
    assert not np.array_equal(runs[0].image, runs[2].image)
    rng = np.random.default_rng(11)  # deferred intensity with the same generator replays the same sample
    later = A.augment_example(img, masks, flows, rng, cfg, 256, 60.0, n_channels=3, apply_intensity=False)
    np.testing.assert_array_equal(A.random_intensity(later.image, rng, cfg), runs[0].image)


def intensity_cfg(**kw) -> A.AugmentConfig:
    off = dict(intensity=True, invert_p=0.0, drop_third_p=0.0, permute_channels=False, brightness_sigma=0.0,
               contrast_log2_range=0.0, grayscale_p=0.0)
    return A.AugmentConfig(**{**off, **kw})


def test_intensity_operations_do_what_they_say(examples) -> None:
    img, masks, flows = examples["hela"]
    crop = A.augment_example(img, masks, flows, np.random.default_rng(0), A.AugmentConfig(), 64, n_channels=3)
    x = crop.image.copy()
    x[1] = x[0] ** 2
    assert not x[2].any()  # the padded channel is empty
    rng = np.random.default_rng(0)
    inv = A.random_intensity(x, rng, intensity_cfg(invert_p=1.0))
    np.testing.assert_allclose(inv[:2], 1 - x[:2], atol=1e-7)
    assert not inv[2].any()
    gray = A.random_intensity(x, rng, intensity_cfg(grayscale_p=1.0))
    np.testing.assert_allclose(gray[0], x[:2].mean(axis=0), atol=1e-6)
    assert not gray[1:].any()
    dropped = A.random_intensity(np.stack([x[0], x[1], x[0] + 1]), rng, intensity_cfg(drop_third_p=1.0))
    np.testing.assert_array_equal(dropped[:2], x[:2])
    assert not dropped[2].any()
    perm = A.random_intensity(x, rng, intensity_cfg(permute_channels=True))
    assert sorted(perm.reshape(3, -1).sum(1).tolist()) == sorted(x.reshape(3, -1).sum(1).tolist())
    jitter = A.random_intensity(x, rng, intensity_cfg(brightness_sigma=0.2, contrast_log2_range=1.0))
    assert not jitter[2].any()
    for c in range(2):  # an affine map per channel with gain in [0.5, 2]
        gain, offset = np.polyfit(x[c].ravel(), jitter[c].ravel(), 1)
        assert 0.5 <= gain <= 2.0
        np.testing.assert_allclose(jitter[c], gain * x[c] + offset, atol=1e-5)
    state = rng.bit_generator.state
    assert A.random_intensity(x, rng, A.AugmentConfig()) is x and rng.bit_generator.state == state


def test_intensity_frequencies() -> None:
    x = np.broadcast_to(np.array([0.2, 0.3, 0.6], np.float32)[:, None, None], (3, 2, 2)).copy()
    cfg = intensity_cfg(invert_p=0.25, drop_third_p=0.1, grayscale_p=0.1)
    rng = np.random.default_rng(1)
    n, inverted, dropped, grayed = 4000, 0, 0, 0
    gray_values = {(0.2 + 0.3 + 0.6) / 3: (0, 0), (0.8 + 0.7 + 0.4) / 3: (1, 0), 0.25: (0, 1), 0.75: (1, 1)}
    for _ in range(n):
        out = A.random_intensity(x, rng, cfg)[:, 0, 0]
        if out[1] == 0:  # grayscale: the mean identifies inversion and drop
            g = [k for k in gray_values if abs(k - out[0]) < 1e-6]
            assert len(g) == 1 and out[2] == 0
            inv, drop = gray_values[g[0]]
            grayed += 1
        else:
            inv, drop = int(abs(out[0] - 0.8) < 1e-6), int(out[2] == 0)
        inverted, dropped = inverted + inv, dropped + drop
    assert abs(inverted / n - 0.25) < 0.03 and abs(dropped / n - 0.1) < 0.02 and abs(grayed / n - 0.1) < 0.02


def test_to_model_channels_matches_cellpose_training() -> None:
    hela, _ = read_shared_pair(*HELA)
    rgb, _ = read_shared_pair(*TISSUE)
    chw = np.moveaxis(rgb, -1, 0)
    cases = [hela, chw[:2], chw, np.concatenate([chw, chw[:1]])]
    for image in cases:
        ours = A.to_model_channels(image, 3)
        theirs = cp_train._reshape_norm([image if image.ndim == 2 else np.moveaxis(image, 0, -1)])[0]
        assert ours.dtype == np.float32 and ours.shape == (3, *image.shape[-2:])
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(A.to_model_channels(chw, 3), chw)  # (H, W, 3) given as (3, H, W)
    np.testing.assert_array_equal(A.to_model_channels(hela, 1)[0], hela)
    with pytest.raises(ValueError):
        A.to_model_channels(hela[None, None], 3)


def test_normalization_equals_cellpose_and_bounds() -> None:
    rgb, _ = read_shared_pair(*TISSUE)
    chw = np.moveaxis(rgb, -1, 0)
    ours = A.normalize_image(chw)
    theirs = np.moveaxis(cp_transforms.normalize_img(rgb.astype(np.float32), axis=-1), -1, 0)
    np.testing.assert_array_equal(ours, theirs)
    assert not ours[0].any()  # the empty red channel stays 0
    lo, hi = A.percentile_bounds_per_channel(chw)
    np.testing.assert_array_equal(A.apply_bounds(chw, lo, hi), ours)
    np.testing.assert_array_equal(A.apply_bounds(chw[:, 100:300, 50:250], lo, hi), ours[:, 100:300, 50:250])
    with pytest.raises(ValueError, match="do not match"):
        A.apply_bounds(chw, lo[:2], hi[:2])


def test_config_presets_and_validation() -> None:
    paper, fine = A.AugmentConfig.paper(), A.AugmentConfig.finetune()
    assert (paper.scale_mode, paper.rescale_to_diam_mean, paper.intensity) == ("log2", True, True)
    assert (fine.scale_mode, fine.scale_range, fine.rescale_to_diam_mean) == ("range", 0.5, False)
    assert not fine.intensity
    merged = OmegaConf.merge(OmegaConf.structured(A.AugmentConfig), {"scale_mode": "log2"})
    assert A.AugmentConfig(**OmegaConf.to_container(merged)).scale_mode == "log2"
    with pytest.raises(ValueError, match="scale_mode"):
        A.AugmentConfig(scale_mode="uniform")
    with pytest.raises(ValueError, match="invert_p"):
        A.AugmentConfig(invert_p=1.5)
    with pytest.raises(ValueError, match="diameter"):
        A.draw_geometry(np.random.default_rng(0), (300, 400), 256, paper)
    # log2 + rescale to 30 px: scales 30/d * [0.25, 4]; diameters below 5 are floored at 5
    lo = A.geometry_from_uniforms(np.zeros(5), (300, 400), 256, paper, 60.0).scale
    hi = A.geometry_from_uniforms(np.ones(5), (300, 400), 256, paper, 2.0).scale
    assert lo == pytest.approx(0.25 * 30 / 60) and hi == pytest.approx(4 * 30 / 5)
