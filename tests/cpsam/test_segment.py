"""Segmenter: tiled flows equal cellpose's `run_net` pipeline; cross-image batching changes nothing.

A small convolutional stand-in network (3x3 conv + tanh: position dependent, not flip
equivariant) is run through both our Segmenter and cellpose 4.2.1.1's own `core.run_net` /
transforms, on real images. The real networks are compared in tests/cpsam/test_segment_golden.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cellpose import core as cp_core
from cellpose import transforms as cp_transforms
from conftest import read_shared_image
from torch import nn

from cpsam.segment import ImageError, InferenceRules, Segmenter, check_image, tiles_per_image

CP4_RULES = InferenceRules(tile_size=256, pad_to_tile=True, float32_rescale=False)
CP3_RULES = InferenceRules(tile_size=224, pad_to_tile=False, float32_rescale=True)


class ConvNet(nn.Module):
    """A 3x3 conv + tanh following the cpsam model interface (uses the first C weight channels of
    a C-channel input, like CP-SAM's patch embedding); exposes .device/.dtype for cellpose."""

    def __init__(self, in_channels: int, tile_size: int, diam_mean: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 3, 3, generator=gen))
        self.bias = nn.Parameter(torch.randn(3, generator=gen))
        self.diam_mean = nn.Parameter(torch.tensor([diam_mean]), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.tensor([diam_mean]), requires_grad=False)
        self.tile_size = tile_size
        self.in_channels = in_channels

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = 5 * torch.tanh(F.conv2d(x, self.weight[:, : x.shape[1]], self.bias, padding=1))
        return y, torch.zeros(x.shape[0], 256)


def cellpose4_flows(net: nn.Module, image: np.ndarray, rescale: float, augment: bool) -> np.ndarray:
    """cellpose 4.2.1.1 CellposeModel._run_net for a 2-D image: (3, H, W) [dY, dX, cellprob]."""
    x = cp_transforms.normalize_img(cp_transforms.convert_image(image), axis=-1)[None]
    yf, _ = cp_core.run_net(net, x, batch_size=8, augment=augment, tile_overlap=0.1, bsize=256,
                            rsz=rescale if rescale != 1.0 else None)
    if rescale != 1.0:
        yf = cp_transforms.resize_image(yf, x.shape[1], x.shape[2])
    return yf[0].transpose(2, 0, 1)


def cellpose3_flows(net: nn.Module, image: np.ndarray, rescale: float, augment: bool) -> np.ndarray:
    """cellpose 3.1.1.2's run_net/_run_tiled for a grayscale image, rebuilt from the (unchanged)
    cellpose transforms: normalize -> resize -> pad (no minimum) -> 224 tiles -> blend -> resize back."""
    x = cp_transforms.normalize_img(np.stack([image, np.zeros_like(image)], -1).astype(np.float32), axis=-1)
    if rescale != 1.0:
        x = cp_transforms.resize_image(x, rsz=rescale)
    y1, y2, x1, x2 = cp_transforms.get_pad_yx(*x.shape[:2])
    padded = np.pad(x.transpose(2, 0, 1), ((0, 0), (y1, y2), (x1, x2)))
    IMG, ysub, xsub, ly, lx = cp_transforms.make_tiles(padded, bsize=224, augment=augment, tile_overlap=0.1)
    ny, nx, nchan, th, tw = IMG.shape
    y = np.concatenate([cp_core._forward(net, IMG.reshape(-1, nchan, th, tw)[k : k + 8])[0]
                        for k in range(0, ny * nx, 8)])
    if augment:
        y = cp_transforms.unaugment_tiles(y.reshape(ny, nx, 3, th, tw)).reshape(-1, 3, th, tw)
    yf = cp_transforms.average_tiles(y, ysub, xsub, ly, lx)[:, : padded.shape[1], : padded.shape[2]]
    yf = yf[:, y1 : y1 + x.shape[0], x1 : x1 + x.shape[1]].transpose(1, 2, 0)
    if rescale != 1.0:
        yf = cp_transforms.resize_image(np.ascontiguousarray(yf), image.shape[0], image.shape[1])
    return yf.transpose(2, 0, 1)


def our_flows(seg: Segmenter, images: list[np.ndarray], diameter, augment: bool, **kw) -> list[np.ndarray]:
    results = seg.segment(images, diameter=diameter, augment=augment, compute_masks=False, **kw)
    return [np.concatenate([r.dP, r.cellprob[None]]) for r in results]


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize(
    "folder,name,diameter",
    [
        ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_01_t013", 17.0),  # 700x1100 -> 1235x1941, 6x10 tiles
        ("tissue_multiplex_neurips22", "neurips22_cell_00849", None),  # RGB, one empty channel
        ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA", 45.0),  # 869x51 -> 579x34, padded to a tile
    ],
)
def test_cellpose4_rules_equal_cellpose_run_net(folder: str, name: str, diameter, augment: bool) -> None:
    image = read_shared_image(folder, name)
    net = ConvNet(3, 256, 30.0)
    seg = Segmenter(net, batch_size=8, rules=CP4_RULES)
    ours = our_flows(seg, [image], diameter, augment)[0]
    theirs = cellpose4_flows(net, image, 30.0 / diameter if diameter else 1.0, augment)
    assert ours.shape == theirs.shape == (3, *image.shape[:2])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize(
    "folder,name,diameter",
    [
        ("phase_ctc_U373", "PhC-C2DH-U373_01_t021", 60.0),  # 520x696 -> 234x313: tiles shrink to 224x224
        ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA", None),  # 51 px wide: 224x64 tiles
    ],
)
def test_cellpose3_rules_equal_cellpose3_tiling(folder: str, name: str, diameter, augment: bool) -> None:
    image = read_shared_image(folder, name)
    net = ConvNet(2, 224, 27.0)
    seg = Segmenter(net, batch_size=8, rules=CP3_RULES)
    ours = our_flows(seg, [image], diameter, augment)[0]
    rescale = float(np.float32(27.0) / np.float32(diameter)) if diameter else 1.0
    theirs = cellpose3_flows(net, image, rescale, augment)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("rules", [CP4_RULES, CP3_RULES])
def test_cross_image_batching_equals_one_at_a_time(rules: InferenceRules) -> None:
    """Tiles of several images (different sizes, channels, tile shapes) share batches; results are
    those of segmenting each image alone."""
    images = [
        read_shared_image("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA"),
        read_shared_image("he_miccai2015_cpm", "cpm15_image06"),
        read_shared_image("bact_phase_neurips22", "neurips22_cell_00528"),
        read_shared_image("bact_bf_mothermachine_baby", "baby_mmsCMOS_testB"),
    ]
    diameters = [None, 20.0, 12.0, None]
    net = ConvNet(3 if rules.pad_to_tile else 2, rules.tile_size, 30.0)
    together = our_flows(Segmenter(net, batch_size=5, rules=rules), images, diameters, False)
    alone = Segmenter(net, batch_size=1, rules=rules)
    for image, diam, got in zip(images, diameters, together, strict=True):
        np.testing.assert_allclose(got, our_flows(alone, [image], diam, False)[0], rtol=1e-5, atol=1e-5)


def test_iter_segment_is_lazy_and_ordered() -> None:
    """iter_segment pulls images only as tiles are needed and yields each result in input order."""
    net = ConvNet(3, 256, 30.0)
    seg = Segmenter(net, batch_size=2, rules=CP4_RULES)
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")  # 200x200: one tile
    pulled: list[int] = []

    def source():
        for k in range(5):
            pulled.append(k)
            yield np.roll(image, 7 * k, axis=1)

    stream = seg.iter_segment(source(), compute_masks=False)
    first = next(stream)
    assert pulled == [0, 1, 2]  # the batch of 2 tiles was full when image 2 arrived
    rest = list(stream)
    assert pulled == [0, 1, 2, 3, 4] and len(rest) == 4
    for k, res in enumerate([first, *rest]):
        alone = seg.segment([np.roll(image, 7 * k, axis=1)], compute_masks=False)[0]
        np.testing.assert_allclose(res.cellprob, alone.cellprob, rtol=1e-5, atol=1e-5)


def test_niter_and_rescale_follow_cellpose() -> None:
    net = ConvNet(2, 224, 27.0)
    seg = Segmenter(net, rules=CP3_RULES)
    assert seg.rescale_for(17.0) == float(np.float32(27.0) / np.float32(17.0))
    assert seg.rescale_for(None) == 1.0 and seg.rescale_for(0) == 1.0
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")
    res = seg.segment([image], diameter=17.0, compute_masks=False)[0]
    assert res.niter == int(200 / res.rescale) == 125
    assert res.dP.shape == (2, 200, 200) and res.cellprob.shape == (200, 200)
    assert tiles_per_image((700, 1100), 30 / 17, CP4_RULES) == 6 * 10  # 1235x1941 padded to 1248x1952


@pytest.mark.parametrize(
    "bad,problem",
    [
        (np.zeros((0, 10)), "no pixels"),
        (np.zeros((2, 3, 8, 8)), "dimensionality"),
        (np.zeros((2, 0, 8, 8)), "no pixels"),
        (np.zeros(16), "dimensionality"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN/Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN/Inf"),
        (np.array([["a", "b"]]), "pixel type"),
    ],
)
def test_bad_arrays_raise_image_error(bad: np.ndarray, problem: str) -> None:
    with pytest.raises(ImageError, match=problem):
        check_image(bad)
    seg = Segmenter(ConvNet(3, 256, 30.0), rules=CP4_RULES)
    with pytest.raises(ImageError, match=problem):
        seg.segment([bad], compute_masks=False)


def test_constant_image_gives_zero_flows_input() -> None:
    """A blank field of view is valid input: normalization maps it to zeros (as cellpose)."""
    net = ConvNet(3, 256, 30.0)
    seg = Segmenter(net, rules=CP4_RULES)
    res = seg.segment([np.full((100, 120), 7, np.uint16)], compute_masks=False)[0]
    theirs = cellpose4_flows(net, np.full((100, 120), 7, np.uint16), 1.0, False)
    np.testing.assert_allclose(np.concatenate([res.dP, res.cellprob[None]]), theirs, rtol=1e-5, atol=1e-5)


def test_bf16_runs_close_to_float32() -> None:
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")
    fp32 = our_flows(Segmenter(ConvNet(3, 256, 30.0), rules=CP4_RULES), [image], None, False)[0]
    bf16 = our_flows(Segmenter(ConvNet(3, 256, 30.0), rules=CP4_RULES, bf16=True), [image], None, False)[0]
    assert bf16.dtype == np.float32
    err = np.abs(bf16 - fp32)
    assert 0 < err.max() <= 0.1 * np.abs(fp32).max() and err.mean() <= 0.01 * np.abs(fp32).mean()
