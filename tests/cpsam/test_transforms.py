"""Each transform of cpsam/transforms.py against the installed cellpose 4.2.1.1, on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose import transforms as cp_transforms
from conftest import read_shared_image

from cpsam import transforms

REAL_IMAGES = [
    ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_01_t013"),  # (700, 1100) uint16
    ("tissue_multiplex_neurips22", "neurips22_cell_00849"),  # (512, 512, 3) uint8, R empty
    ("he_miccai2015_cpm", "cpm15_image06"),  # (392, 459, 3) uint8
    ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA"),  # (869, 51) uint16, narrower than a tile
]


@pytest.mark.parametrize("folder,name", REAL_IMAGES)
def test_channels_and_normalization_equal_cellpose(folder: str, name: str) -> None:
    image = read_shared_image(folder, name)
    ours = transforms.normalize_percentile(transforms.to_channels_last(image))
    theirs = cp_transforms.normalize_img(cp_transforms.convert_image(image), axis=-1)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_normalize99_single_channel_and_empty_channel() -> None:
    image = read_shared_image("tissue_multiplex_neurips22", "neurips22_cell_00849")
    for c in range(3):
        ours = transforms.normalize_percentile(image[..., c : c + 1])[..., 0]
        if np.ptp(image[..., c]) == 0:
            assert not ours.any()  # the empty red channel stays all zeros
        else:
            np.testing.assert_array_equal(ours, cp_transforms.normalize99(image[..., c]))
    assert np.ptp(image[..., 0]) == 0, "the test image's red channel is documented as empty"


def test_percentiles_subsample_huge_images_like_cellpose() -> None:
    rng = np.random.default_rng(0)
    big = rng.gamma(2.0, 300.0, size=(3400, 3400)).astype(np.uint16)  # > 224**3 pixels
    assert big.size > transforms.PERCENTILE_SUBSAMPLE_ABOVE
    ours = transforms.normalize_percentile(big[:, :, None])[..., 0]
    theirs = cp_transforms.normalize99(big, downsample=True)
    np.testing.assert_array_equal(ours, theirs)
    # and the subsample is really used: the full-image percentiles give different numbers
    assert not np.array_equal(theirs, cp_transforms.normalize99(big, downsample=False))


@pytest.mark.parametrize("shape", [(40, 50), (3, 40, 50), (40, 50, 3), (2, 40, 50), (40, 50, 2), (5, 40, 50)])
def test_channel_axis_guess_equals_convert_image(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    ours = transforms.to_channels_last(x)
    theirs = cp_transforms.convert_image(x)
    np.testing.assert_array_equal(ours[..., : theirs.shape[-1]], theirs)
    assert ours.shape[:2] == theirs.shape[:2]


def test_select_channels_cellpose3_convention() -> None:
    rgb = read_shared_image("tissue_multiplex_neurips22", "neurips22_cell_00849").astype(np.float32)
    gray = rgb[..., 1]
    # [2, 3] -> green to segment, blue as nucleus (the golden neurips case)
    got = transforms.select_channels(rgb, [2, 3], 2)
    np.testing.assert_array_equal(got, rgb[..., [1, 2]])
    # [0, 0] on RGB -> channel mean, then a zero channel
    got = transforms.select_channels(rgb, [0, 0], 2)
    np.testing.assert_array_equal(got[..., 0], rgb.mean(axis=-1))
    assert not got[..., 1].any()
    # [2, 0] -> green, zero; for a 3-channel model a second zero channel
    got = transforms.select_channels(rgb, [2, 0], 3)
    np.testing.assert_array_equal(got[..., 0], rgb[..., 1])
    assert not got[..., 1:].any()
    # grayscale images ignore channels; None takes the first in_channels channels
    np.testing.assert_array_equal(transforms.select_channels(gray[..., None], [2, 3], 2)[..., 0], gray)
    np.testing.assert_array_equal(transforms.select_channels(rgb, None, 2), rgb[..., :2])
    np.testing.assert_array_equal(transforms.select_channels(rgb, None, 1), rgb[..., :1])
    with pytest.raises(ValueError, match="out of range"):
        transforms.select_channels(rgb, [4, 0], 2)


@pytest.mark.parametrize("length", [1, 17, 100, 200, 239, 240, 241, 255, 256, 257, 300, 511, 700, 1100])
def test_get_pad_yx_equals_cellpose(length: int) -> None:
    for other in (64, 256, 333):
        assert transforms.get_pad_yx(length, other, tile_size=256) == cp_transforms.get_pad_yx(
            length, other, min_size=(256, 256)
        )
        assert transforms.get_pad_yx(length, other) == cp_transforms.get_pad_yx(length, other)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize(
    "bsize,shape", [(256, (528, 528)), (256, (720, 1120)), (224, (896, 80)), (224, (96, 1184))]
)
def test_tile_starts_and_contents_equal_make_tiles(augment: bool, bsize: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    img = rng.random((2, *shape)).astype(np.float32)
    IMG, ysub, xsub, ly, lx = cp_transforms.make_tiles(img, bsize=bsize, augment=augment, tile_overlap=0.1)
    ys = transforms.tile_starts(shape[0], bsize, 0.1, augment)
    xs = transforms.tile_starts(shape[1], bsize, 0.1, augment)
    assert IMG.shape[:2] == (len(ys), len(xs))
    np.testing.assert_array_equal([s[0] for s in ysub], np.repeat(ys, len(xs)))
    np.testing.assert_array_equal([s[0] for s in xsub], np.tile(xs, len(ys)))
    padded = np.zeros((2, ly, lx), np.float32)
    padded[:, : shape[0], : shape[1]] = img
    th, tw = IMG.shape[-2:]
    for j, y0 in enumerate(ys):
        for i, x0 in enumerate(xs):
            tile = padded[:, y0 : y0 + th, x0 : x0 + tw]
            flip_y, flip_x = transforms.flip_pattern(j, i) if augment else (False, False)
            tile = tile[:, ::-1] if flip_y else tile
            tile = tile[:, :, ::-1] if flip_x else tile
            np.testing.assert_array_equal(tile, IMG[j, i])


@pytest.mark.parametrize("ly,lx", [(256, 256), (224, 224), (224, 96), (80, 224), (300, 300)])
def test_taper_is_cellpose_taper_mask(ly: int, lx: int) -> None:
    ours = np.outer(transforms.taper_1d(ly), transforms.taper_1d(lx))
    np.testing.assert_allclose(ours, cp_transforms._taper_mask(ly=ly, lx=lx), rtol=1e-12, atol=0)


def test_separable_blending_equals_average_tiles() -> None:
    rng = np.random.default_rng(3)
    ly, lx, bsize = 528, 800, 256
    img = np.zeros((1, ly, lx), np.float32)
    _, ysub, xsub, _, _ = cp_transforms.make_tiles(img, bsize=bsize, tile_overlap=0.1)
    y = rng.normal(size=(len(ysub), 3, bsize, bsize)).astype(np.float32)
    theirs = cp_transforms.average_tiles(y, ysub, xsub, ly, lx)
    ys = transforms.tile_starts(ly, bsize)
    xs = transforms.tile_starts(lx, bsize)
    mask = np.outer(transforms.taper_1d(bsize), transforms.taper_1d(bsize))
    acc = np.zeros((3, ly, lx), np.float64)
    for k, (sy, sx) in enumerate(zip(ysub, xsub, strict=True)):
        acc[:, sy[0] : sy[1], sx[0] : sx[1]] += y[k] * mask
    acc /= transforms.blend_weight_1d(ly, ys, bsize)[:, None]
    acc /= transforms.blend_weight_1d(lx, xs, bsize)[None, :]
    np.testing.assert_allclose(acc, theirs, rtol=1e-5, atol=1e-6)


def test_unflip_equals_unaugment_tiles() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=(3, 4, 3, 32, 32)).astype(np.float32)
    theirs = cp_transforms.unaugment_tiles(y.copy())
    for j in range(3):
        for i in range(4):
            got = transforms.unflip_output(torch.from_numpy(y[j, i].copy()), *transforms.flip_pattern(j, i))
            np.testing.assert_array_equal(got.numpy(), theirs[j, i])


@pytest.mark.parametrize("rescale", [30 / 17, 0.5, 1.37])
def test_resize_equals_cellpose_resize_image(rescale: float) -> None:
    image = read_shared_image("he_miccai2015_cpm", "cpm15_image06")
    x = transforms.normalize_percentile(transforms.to_channels_last(image))
    shape = transforms.scaled_shape(*x.shape[:2], rescale)
    theirs = cp_transforms.resize_image(x, rsz=rescale)
    ours = transforms.resize_image(x, *shape)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="diameter too large"):
        transforms.scaled_shape(10, 10, 0.05)
