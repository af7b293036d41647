"""`cpsam.window` and `Segmenter.segment_window`: a rectangle segmented on the whole image's resize and tile grid.

The resize rule is checked against OpenCV (what the in-memory run calls); windows are checked against the
in-memory segmentation of the whole image: flows equal to float rounding inside the window, masks equal away
from its edges, for the classic cyto_0 (cellpose-3 rules, 224-px tiles) and a tiny CP-SAM (cellpose-4 rules,
tiles padded to 256 px), with and without resizing and test-time augmentation.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from benchmarks.bench_blockwise import FOLDER, SOURCES, build_mosaic
from cpsam import transforms
from cpsam.metrics import average_precision
from cpsam.segment import Segmenter
from cpsam.window import linear_taps, plan_window, resize_window, source_span

RESIZES = [((100, 130), (176, 229)), ((517, 300), (301, 173)), ((64, 64), (113, 97)), ((200, 200), (100, 100)),
           ((37, 41), (37, 90)), ((50, 60), (50, 60))]


@pytest.mark.parametrize(("src", "dst"), RESIZES)
def test_resize_window_equals_a_crop_of_opencvs_whole_resize(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((*src, 2), dtype=np.float32)
    whole = transforms.resize_image(image, *dst)
    for window in [(0, dst[0], 0, dst[1]), (3, dst[0] // 2, dst[1] // 3, dst[1] - 1), (dst[0] - 5, dst[0], 0, 7)]:
        ys, xs = source_span(src[0], dst[0], *window[:2]), source_span(src[1], dst[1], *window[2:])
        crop = image[ys[0] : ys[1], xs[0] : xs[1]]
        out = resize_window(crop, (ys[0], xs[0]), src, dst, window)
        np.testing.assert_allclose(out, whole[window[0] : window[1], window[2] : window[3]], rtol=0, atol=2e-7)


def test_linear_taps_clamp_at_the_edges_and_source_span_covers_them() -> None:
    i0, i1, frac = linear_taps(10, 25, 0, 25)
    assert i0.min() == 0 and i1.max() == 9 and frac.dtype == np.float32
    assert frac[0] == 0 and frac[-1] == 0  # outside the source: the edge pixel, as OpenCV
    assert source_span(10, 25, 0, 25) == (0, 10)
    assert source_span(1000, 500, 100, 110) == (200, 220)
    with pytest.raises(ValueError, match="taps"):
        resize_window(np.zeros((5, 5), np.float32), (0, 0), (1000, 1000), (500, 500), (100, 110, 100, 110))


def test_plan_selects_every_tile_that_touches_the_window() -> None:
    plan = plan_window((1000, 700), (300, 420, 0, 700), (1764, 1235), tile=224, pad_to_tile=False, overlap=0.1,
                       augment=False)
    pads = transforms.get_pad_yx(1764, 1235)
    starts = transforms.tile_starts(1764 + pads[0] + pads[1], 224)
    lo, hi = plan.y.resized[0] + pads[0], plan.y.resized[1] + pads[0]
    touching = [s for s in starts if s < hi and s + 224 > lo]
    assert list(plan.y.starts + plan.y.extent[0]) == touching
    assert plan.y.extent == (touching[0], touching[-1] + 224)
    assert plan.x.source == (0, 700) and plan.x.first_tile == 0
    # only the rows the touching tiles need are read: the window's 120 rows and at most a tile on each side
    assert plan.y.source[0] <= 300 and plan.y.source[1] >= 420
    assert plan.y.source[1] - plan.y.source[0] <= 120 + 2 * 224 * 1000 / 1764 + 4
    with pytest.raises(ValueError, match="outside"):
        plan_window((100, 100), (50, 120, 0, 10), (100, 100), 224, False, 0.1, False)


def _mosaic(size: int) -> np.ndarray:
    """A mosaic of real nuclei crops (DeepCell), size x size uint16; skips the test when ../shared lacks them."""
    for name in SOURCES:
        shared_path("data", FOLDER, f"{name}_img.tif")
        shared_path("data", FOLDER, f"{name}_masks.tif")
    return build_mosaic(size)[0]


def _bounds(segmenter: Segmenter, image: np.ndarray) -> list[tuple[np.floating, np.floating] | None]:
    """The whole image's 1st / 99th percentiles per network input channel (what the in-memory run uses)."""
    x = transforms.select_channels(transforms.to_channels_last(image), segmenter.default_channels,
                                   segmenter.in_channels)
    return [None if np.ptp(x[..., c]) <= 0 else transforms.percentile_bounds(x[..., c]) for c in range(x.shape[-1])]


def _check_window(segmenter: Segmenter, image: np.ndarray, window: tuple[int, int, int, int], margin: int,
                  **kwargs) -> None:
    bounds = _bounds(segmenter, image)
    whole = segmenter.segment([image], **kwargs)[0]
    reads: list[tuple[int, int, int, int]] = []

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        reads.append((y0, y1, x0, x1))
        return image[y0:y1, x0:x1]

    part = segmenter.segment_window(read, image.shape, window, normalization=bounds, **kwargs)
    y0, y1, x0, x1 = window
    assert len(reads) == 1
    np.testing.assert_allclose(part.dP, whole.dP[:, y0:y1, x0:x1], rtol=0, atol=2e-4)
    np.testing.assert_allclose(part.cellprob, whole.cellprob[y0:y1, x0:x1], rtol=0, atol=2e-4)
    assert part.niter == whole.niter
    # masks: equal in the window's interior (objects the window's edge cuts can differ)
    inner = (slice(margin, y1 - y0 - margin), slice(margin, x1 - x0 - margin))
    ours, ref = part.masks[inner], whole.masks[y0:y1, x0:x1][inner]
    ap = average_precision(ref, ours, [0.5])[0]
    assert ref.max() > 10 and ap >= 0.99, ap


@pytest.mark.parametrize("diameter", [17.0, 30.0])
def test_cyto0_window_equals_the_whole_image(cyto0_net, diameter: float) -> None:
    segmenter = Segmenter(cyto0_net.eval(), device="cpu")
    image = _mosaic(400)
    _check_window(segmenter, image, (123, 370, 41, 283), margin=2 * int(diameter), diameter=diameter)


def test_cyto0_window_with_augmentation_keeps_the_global_flip_pattern(cyto0_net) -> None:
    segmenter = Segmenter(cyto0_net.eval(), device="cpu")
    _check_window(segmenter, _mosaic(352), (110, 352, 0, 230), margin=48, diameter=24.0, augment=True)


def test_cpsam_window_equals_the_whole_image(cpsam_tiny) -> None:
    """cellpose-4 rules (tiles padded to 256 px); random weights: flows are compared, not masks."""
    segmenter = Segmenter(cpsam_tiny, device="cpu")
    image = np.stack([_mosaic(700)] * 3, axis=-1)
    whole = segmenter.segment([image], diameter=45.0, compute_masks=False)[0]
    window = (300, 650, 120, 420)
    part = segmenter.segment_window(lambda y0, y1, x0, x1: image[y0:y1, x0:x1], image.shape[:2], window,
                                    normalization=_bounds(segmenter, image), diameter=45.0, compute_masks=False)
    y0, y1, x0, x1 = window
    np.testing.assert_allclose(part.dP, whole.dP[:, y0:y1, x0:x1], rtol=0, atol=2e-4)
    np.testing.assert_allclose(part.cellprob, whole.cellprob[y0:y1, x0:x1], rtol=0, atol=2e-4)
