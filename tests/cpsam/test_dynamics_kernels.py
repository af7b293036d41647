"""The fast numba kernels of `cpsam.dynamics` against their plain one-at-a-time forms (cp4, and cp3 where noted).

* `masks_cp4._integrate_lanes` (`_LANES` trajectories in lockstep, cycle test every `_ROUND` steps) must give
  the positions of `_integrate_range` (one trajectory at a time, the form checked against cellpose in
  test_dynamics.py) bit for bit, serial or parallel, at any niter; under the cellpose 3 rules those of
  `masks_cp3._integrate_range` (checked against cellpose 3 in test_dynamics_cp3.py);
* `masks_cp3.flow_errors` (per object) must equal `mask_errors` of `unit_flows` (whole image) bit for bit;
* `flows_numba.flow_errors` (QC fused with the diffusion) must equal the per-mask mean of the squared
  error computed from `flows_numba.flows_numba`'s unit flows, in plain numpy;
* `masks_cp4.normalised_field` (numba) must equal the numpy expression it replaced, byte for byte.
Real network flows: golden cyto_0 outputs of ../shared/golden (skipped with a reason when absent).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import load_golden_flows

from cpsam import dynamics
from cpsam.dynamics import flows_numba, masks_cp3, masks_cp4


def _golden_crop(name: str, top: int, left: int, side: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = load_golden_flows(name)
    rows, cols = slice(top, top + side), slice(left, left + (width or side))
    dP = np.ascontiguousarray(d["dP"][:, rows, cols], dtype=np.float32)
    return dP, np.ascontiguousarray(d["cellprob"][rows, cols], dtype=np.float32)


def _one_at_a_time(field, ys, xs, niter, sx, sy) -> np.ndarray:
    out = np.empty((2, len(ys)), np.int32)
    masks_cp4._integrate_range(field, ys, xs, niter, out, 0, len(ys), sx, sy, 0.0)
    return out


# 0, 1, a short first round, exact multiples of the round, the cellpose 3 niter of a large diameter
NITERS = (0, 1, 5, masks_cp4._ROUND, masks_cp4._ROUND + 1, 2 * masks_cp4._ROUND, 200, 333)


@pytest.mark.parametrize(("name", "top", "left", "side", "width"), [("cpm15_image01", 0, 0, 488, 488),
                                                                    ("usiigaci_set1", 300, 300, 256, 256),
                                                                    ("usiigaci_set1", 0, 100, 200, 330)])
def test_lanes_give_the_one_at_a_time_positions(name: str, top: int, left: int, side: int, width: int) -> None:
    dP, cp = _golden_crop(name, top, left, side, width)
    fg = cp > 0
    field = masks_cp4.normalised_field(dP, fg)
    ys, xs = (a.astype(np.int32) for a in np.nonzero(fg))
    assert len(ys) > 8000  # several chunks of the parallel kernel
    sy, sx = np.float32(side - 1), np.float32(width - 1)
    for niter in NITERS:
        want = _one_at_a_time(field, ys, xs, niter, sx, sy)
        np.testing.assert_array_equal(masks_cp4._integrate_serial(field, ys, xs, niter, sx, sy, 0.0), want)
        deal = masks_cp4.dealt_chunks(64)
        np.testing.assert_array_equal(masks_cp4._integrate_parallel(field, ys, xs, niter, sx, sy, deal, 0.0), want)
    # a lane count that does not divide the pixels, chunks of a few pixels
    np.testing.assert_array_equal(masks_cp4._integrate_parallel(field, ys[:4099], xs[:4099], 200, sx, sy,
                                                                 masks_cp4.dealt_chunks(1000), 0.0),
                                  _one_at_a_time(field, ys[:4099], xs[:4099], 200, sx, sy))


@pytest.mark.parametrize(("name", "top", "left", "side", "width"), [("cpm15_image01", 0, 0, 488, 488),
                                                                    ("usiigaci_set1", 0, 100, 200, 330)])
def test_cp3_lanes_give_the_one_at_a_time_positions(name: str, top: int, left: int, side: int, width: int) -> None:
    """The cellpose 3 rules in the same lanes (pixel coordinates, clamped corners, mixed precision)."""
    dP, cp = _golden_crop(name, top, left, side, width)
    fg = cp > 0
    field = np.ascontiguousarray(dP * fg / np.float32(5.0), dtype=np.float32)
    lanes = masks_cp3.lane_field(field)
    ys, xs = (a.astype(np.int32) for a in np.nonzero(fg))
    for niter in NITERS:
        want = np.empty((2, len(ys)), np.int32)
        masks_cp3._integrate_range(field, ys, xs, niter, want, 0, len(ys), 0.0)
        np.testing.assert_array_equal(masks_cp3._integrate_serial(lanes, ys, xs, niter, 0.0), want)
        np.testing.assert_array_equal(masks_cp3._integrate_parallel(lanes, ys, xs, niter, masks_cp4.dealt_chunks(64),
                                                                    0.0), want)
    # trajectories that reach the last row and column, where the far corners are clamped
    assert ((want[0] == side - 1) | (want[1] == width - 1)).any()


def test_integration_is_the_same_on_one_thread_and_on_all() -> None:
    dP, cp = _golden_crop("neurips22_cell_00849", 0, 0, 320)
    fg = cp > 0
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = dynamics.follow_flows(dP, fg, 200)
        masks_one = dynamics.flows_to_masks(dP, cp)
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(dynamics.follow_flows(dP, fg, 200), one)
    np.testing.assert_array_equal(dynamics.flows_to_masks(dP, cp), masks_one)
    assert masks_one.max() > 20


def test_fused_flow_errors_equal_the_errors_of_the_unit_flows() -> None:
    dP, cp = _golden_crop("neurips22_cell_00849", 100, 100, 256)
    masks = dynamics.flows_to_masks(dP, cp, flow_threshold=0.0, min_size=0).astype(np.int32)
    masks[masks == 4] = 0  # an absent label: error 0 under the cp4 rules
    n = int(masks.max())
    assert n > 20
    mu = flows_numba.flows_numba(masks, n)
    e = ((mu - (dP / np.float32(5.0)).astype(np.float64)) ** 2).sum(0)
    inside = masks > 0
    s = np.bincount(masks[inside], e[inside], minlength=n + 1)[1:]
    c = np.bincount(masks[inside], minlength=n + 1)[1:]
    want = np.where(c > 0, s / np.maximum(c, 1), 0.0)
    got = flows_numba.flow_errors(masks, n, dP)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[3] == 0.0 and (got[c > 0] > 0).all()
    np.testing.assert_array_equal(dynamics.flow_error(masks, dP), got)


def test_cp3_per_object_errors_equal_the_whole_image_errors() -> None:
    """cellpose 3's QC per object (no (2, H, W) flows) gives the errors of its whole-image form bit for bit."""
    dP, cp = _golden_crop("cpm15_image01", 0, 0, 300, 420)
    masks = dynamics.flows_to_masks(dP, cp, flow_threshold=0.0, min_size=0, rules="cp3").astype(np.int32)
    masks[masks == 4] = 0  # an absent label: nan under the cp3 rules
    n = int(masks.max())
    assert n > 20
    want = masks_cp3.mask_errors(masks, masks_cp3.unit_flows(masks, n), dP, n)
    got = masks_cp3.flow_errors(masks, n, dP)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[3]) and (got[np.arange(n) != 3] > 0).all()
    np.testing.assert_array_equal(dynamics.flow_error(masks, dP, rules="cp3"), got)


def test_normalised_field_equals_the_numpy_expression() -> None:
    rng = np.random.default_rng(3)
    for h, w in [(1, 5), (37, 53), (64, 1)]:
        dP = (7 * rng.normal(size=(2, h, w))).astype(np.float32)
        fg = rng.random((h, w)) > 0.3
        d = dP * fg / np.float32(5.0)
        want = np.zeros((h + 2, w + 2, 2), np.float32)
        want[1:-1, 1:-1, 0] = d[1] * np.float32(2.0 / max(w - 1, 1))
        want[1:-1, 1:-1, 1] = d[0] * np.float32(2.0 / max(h - 1, 1))
        assert masks_cp4.normalised_field(dP, fg).tobytes() == want.tobytes()
