"""cpsam.dynamics rules="cp3": cellpose 3.1.1.2's CPU flow -> mask rules.

The reference is the golden cellpose 3.1.1.2 output in ../shared/golden/cellpose3_cyto0 (cellpose 3
is not installed: its masks on the golden flows are the golden masks, since the flows are saved at
the image size and resize_and_compute_masks ran on them). The pieces are checked against what
the rules imply: a naive numpy Euler loop, radial flows of a disk, the per-object iteration
count, the nearest-to-mean centre, and the rank-based size filter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose.metrics import average_precision
from conftest import load_golden_flows, read_golden_masks

from cpsam import dynamics
from cpsam.models.cpnet import CPnet
from cpsam.segment import InferenceRules, Segmenter, rules_for

GOLDEN = ["Fluo-N2DL-HeLa_01_t013", "usiigaci_set1", "neurips22_cell_00849", "cpm15_image01"]


def cp3_niter(diameter: float, diam_mean: float = 27.0) -> int:
    """cellpose 3.1.1.2 CellposeModel.eval, resample=True: rescale = diam_mean / diameter and
    niter = 1 / rescale * 200, all numpy float32 (diam_mean is a float32), truncated by np.uint32."""
    rescale = np.float32(diam_mean) / np.float32(diameter)
    return int(np.float32(1.0) / rescale * np.float32(200.0))


@pytest.mark.parametrize("name", GOLDEN)
def test_cp3_rules_reproduce_golden_masks_from_golden_flows(name: str, cyto0_golden_cases: list[dict]) -> None:
    case = next(c for c in cyto0_golden_cases if c["name"] == name)
    flows = load_golden_flows(name)
    golden = read_golden_masks(name)
    niter = cp3_niter(case["diameter"])
    kw = dict(niter=niter, cellprob_threshold=case["cellprob_threshold"], flow_threshold=case["flow_threshold"],
              min_size=case["min_size"])
    exact = dynamics.flows_to_masks(flows["dP"], flows["cellprob"], rules="cp3", **kw)  # exact by default
    # bit-identical, labels included
    assert exact.dtype == golden.dtype and np.array_equal(exact, golden), (name, exact.max(), golden.max())
    fast = dynamics.flows_to_masks(flows["dP"], flows["cellprob"], rules="cp3", exact=False, **kw)
    assert fast.max() == golden.max()
    assert average_precision([golden], [fast], threshold=[0.5])[0][0, 0] == 1.0
    assert (fast != golden).sum() <= 1e-4 * (golden > 0).sum()  # measured: 0, 1, 0, 0 pixels


def test_cp4_rules_do_not_reproduce_the_cellpose3_goldens() -> None:
    """The reason rules="cp3" exists: cellpose 4's rules give 68 masks on 3T3 where cellpose 3 gave 67."""
    flows = load_golden_flows("usiigaci_set1")
    golden = read_golden_masks("usiigaci_set1")
    cp4 = dynamics.flows_to_masks(flows["dP"], flows["cellprob"], niter=cp3_niter(60.0), rules="cp4")
    assert (cp4.max(), golden.max()) == (68, 67)


def test_seed_order_is_torchs_argsort_like_cellpose() -> None:
    """Seeds with equal counts are ordered by torch's default (unstable) argsort in cellpose 3 and 4;
    the order decides overlapping windows. On 3T3 at niter 150 a stable sort gives other masks."""
    from cellpose.dynamics import get_masks_torch  # cellpose 4.2.1.1; cellpose 3.1.1.2 seeds the same way

    flows = load_golden_flows("usiigaci_set1")
    fg = flows["cellprob"] > 0
    pos = dynamics.follow_flows(flows["dP"], fg, 150, rules="cp3")
    ours = dynamics.get_masks(pos, fg)
    ref = get_masks_torch(torch.from_numpy(pos.copy()), np.nonzero(fg), fg.shape, max_size_fraction=0.4)
    np.testing.assert_array_equal(ours, ref)
    assert ours.max() == 138  # with a stable (mergesort) order: 135 masks


# ------------------------------------------------------------------------------ Euler steps
def naive_cp3_steps(dP: np.ndarray, fg: np.ndarray, niter: int) -> np.ndarray:
    """All `niter` steps for all pixels, vectorised numpy, straight from the rule: field dP * fg / 5
    (float32), bilinear with clamped corners in cellpose 3's mixed precision (float32 fractions,
    float64 `1 - f`; the v10 * fy and v11 * fy * fx products in float32), float32 position
    clamped to [0, L - 1]."""
    h, w = fg.shape
    field = dP.astype(np.float32) * fg / np.float32(5.0)
    ys, xs = np.nonzero(fg)
    p = np.stack((ys, xs)).astype(np.float32)
    f64 = np.float64
    for _ in range(niter):
        i = p.astype(np.int32)
        fy, fx = p - i.astype(np.float32)  # float32 fractions (exact)
        gy, gx = 1 - fy.astype(f64), 1 - fx.astype(f64)
        y0 = np.clip(i[0], 0, h - 1)
        x0 = np.clip(i[1], 0, w - 1)
        y1 = np.minimum(y0 + 1, h - 1)
        x1 = np.minimum(x0 + 1, w - 1)
        step = np.empty_like(p)
        for c in range(2):
            v = field[c]
            total = v[y0, x0].astype(f64) * gy * gx + v[y0, x1].astype(f64) * gy * fx.astype(f64)
            total = total + (v[y1, x0] * fy).astype(f64) * gx
            step[c] = (total + (v[y1, x1] * fy * fx).astype(f64)).astype(np.float32)
        p[0] = np.minimum(np.float32(h - 1), np.maximum(np.float32(0), p[0] + step[0]))
        p[1] = np.minimum(np.float32(w - 1), np.maximum(np.float32(0), p[1] + step[1]))
    return p.astype(np.int32)


def test_cp3_steps_equal_naive_loop_on_golden_flow_crop() -> None:
    flows = load_golden_flows("usiigaci_set1")
    dP = np.ascontiguousarray(flows["dP"][:, 300:460, 400:560])
    fg = flows["cellprob"][300:460, 400:560] > 0
    assert fg.sum() > 5000
    ref = naive_cp3_steps(dP, fg, 300)
    # the kernel stops at exact fixed points / cycles: still every position bit for bit
    np.testing.assert_array_equal(dynamics.follow_flows(dP, fg, 300, rules="cp3"), ref)
    fast = dynamics.follow_flows(dP, fg, 300, rules="cp3", exact=False)
    assert (fast != ref).any(axis=0).mean() < 1e-3


def test_cp3_steps_on_random_smooth_field_equal_naive_loop() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float32)
    dP = np.stack((np.sin(yy / 7) * 9 + rng.normal(0, 1, yy.shape), np.cos(xx / 5) * 9 - 3)).astype(np.float32)
    fg = rng.random(yy.shape) > 0.2
    np.testing.assert_array_equal(dynamics.follow_flows(dP, fg, 57, rules="cp3"), naive_cp3_steps(dP, fg, 57))


def test_cp3_steps_are_in_pixel_units_and_clamp_to_the_last_pixel() -> None:
    """A constant flow of 5 * 0.5 moves every pixel 0.5 px per step, stopped at L - 1."""
    h, w = 8, 32
    dP = np.zeros((2, h, w), np.float32)
    dP[1] = 2.5
    fg = np.ones((h, w), bool)
    pos = dynamics.follow_flows(dP, fg, 10, rules="cp3").reshape(2, h, w)
    xs = np.arange(w)
    np.testing.assert_array_equal(pos[1], np.broadcast_to(np.minimum(xs + 5, w - 1), (h, w)))
    np.testing.assert_array_equal(pos[0], np.broadcast_to(np.arange(h)[:, None], (h, w)))


# ---------------------------------------------------------------------------- QC flows
def disk(n: int, cy: int, cx: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.int32)


def test_cp3_flows_of_a_disk_are_radial_and_symmetric() -> None:
    m = disk(41, 20, 20, 12.0)
    mu = dynamics.masks_to_flows(m, rules="cp3").astype(np.float64)
    yy, xx = np.mgrid[0:41, 0:41]
    ry, rx = 20 - yy, 20 - xx
    r = np.hypot(ry, rx)
    sel = (m > 0) & (r >= 2)
    cos = (mu[0] * ry + mu[1] * rx)[sel] / r[sel]
    assert cos.min() > 0.95 and np.median(cos) > 0.999
    np.testing.assert_allclose(np.linalg.norm(mu, axis=0)[sel], 1.0, atol=1e-6)
    assert mu[:, 20, 20].tolist() == [0.0, 0.0]  # the source of a symmetric object: no gradient
    # mirror symmetry of the disk about its centre row / column
    np.testing.assert_allclose(mu[0], -mu[0][::-1], atol=1e-6)
    np.testing.assert_allclose(mu[1], -mu[1][:, ::-1], atol=1e-6)


def test_cp3_flows_are_per_object() -> None:
    """Each object gets its own iteration count: a small cell's flows do not depend on a large
    neighbour (cellpose 4 uses one count for the whole image, so there they do)."""
    small = np.zeros((120, 120), np.int32)
    small[10:20, 10:22] = 1
    both = small.copy()
    both[30:115, 5:110] = 2
    for rules, same in (("cp3", True), ("cp4", False)):
        alone = dynamics.masks_to_flows(small, rules=rules)
        with_big = dynamics.masks_to_flows(both, rules=rules)
        assert np.array_equal(alone[:, small > 0], with_big[:, small > 0]) == same, rules


def test_cp3_source_is_the_pixel_nearest_to_the_mean() -> None:
    """A 1 x 4 bar has its mean at x = 1.5: cellpose 3 takes the first nearest pixel (x = 1),
    cellpose 4 the rounded mean (round half to even: x = 2). The flows point at the source."""
    bar = np.zeros((5, 8), np.int32)
    bar[2, 2:6] = 7
    cp3 = dynamics.masks_to_flows(bar, rules="cp3")[1, 2, 2:6]
    cp4 = dynamics.masks_to_flows(bar, rules="cp4")[1, 2, 2:6]
    np.testing.assert_array_equal(np.sign(cp3[[0, 2, 3]]), [1, -1, -1])
    np.testing.assert_array_equal(np.sign(cp4[[0, 1, 3]]), [1, 1, -1])


def test_cp3_flow_error_is_zero_for_its_own_flows_and_nan_for_absent_labels() -> None:
    m = disk(50, 20, 22, 9.0)
    m[disk(50, 38, 30, 7.0) > 0] = 3  # label 2 absent
    mu = dynamics.masks_to_flows(m, rules="cp3")
    err = dynamics.flow_error(m, 5 * mu, rules="cp3")
    assert err.shape == (3,) and np.isnan(err[1])
    np.testing.assert_allclose(err[[0, 2]], 0.0, atol=1e-12)
    # a flipped field: error (2 * unit)^2 = 4 per pixel, 0 at the source (zero flow)
    moving = np.abs(mu).sum(0) > 0
    expected = [4.0 * moving[m == k].mean() for k in (1, 3)]
    assert [(~moving[m == k]).sum() for k in (1, 3)] == [1, 1]
    np.testing.assert_allclose(dynamics.flow_error(m, -5 * mu, rules="cp3")[[0, 2]], expected, rtol=1e-6)


# ---------------------------------------------------------------------------- size filter
def test_cp3_size_filter_removes_by_rank() -> None:
    """cellpose 3 removes label k + 1 when the k-th present label is small: with labels {1, 3, 4}
    and 4 small, it removes 3 first (then 4, renumbered to 2, in its second pass)."""
    m = np.zeros((40, 40), np.uint16)
    m[2:12, 2:12] = 1
    m[20:30, 2:12] = 3
    m[20:22, 20:22] = 4  # 4 px < min_size
    cp4 = dynamics.fill_holes_and_remove_small_masks(m, min_size=15, rules="cp4")
    cp3 = dynamics.fill_holes_and_remove_small_masks(m, min_size=15, rules="cp3")
    assert cp4.max() == 2 and (cp4 == 2).sum() == 100
    assert cp3.max() == 1 and (cp3 == 1).sum() == 100 and cp3[25, 5] == 0
    # consecutive labels: both rule sets agree
    m[m == 3] = 2
    m[m == 4] = 3
    np.testing.assert_array_equal(dynamics.fill_holes_and_remove_small_masks(m, 15, rules="cp3"),
                                  dynamics.fill_holes_and_remove_small_masks(m, 15, rules="cp4"))


# ---------------------------------------------------------------------------- API
def test_cp3_rules_errors() -> None:
    dP = np.zeros((2, 16, 16), np.float32)
    cp = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="rules must be one of"):
        dynamics.flows_to_masks(dP, cp, rules="cp2")
    with pytest.raises(ValueError, match="rules must be one of"):
        dynamics.flows_to_masks_batch([dP], [cp], rules="cp2", device="cpu")
    with pytest.raises(ValueError, match="rules must be one of"):
        dynamics.masks_to_flows(np.ones((16, 16), np.int32), rules="cp2")
    # a torch device runs the torch cp3 rules (tests/cpsam/test_dynamics_parity.py: the numba masks)
    out = dynamics.flows_to_masks_batch([dP, dP], [cp, -cp], rules="cp3", device="cpu")
    assert [o.shape for o in out] == [(16, 16), (16, 16)] and out[1].max() == 0


def test_segmenter_uses_cp3_mask_rules_and_niter_for_cpnet() -> None:
    net = CPnet([2, 8, 16], diam_mean=27.0)
    rules = rules_for(net)
    assert rules.mask_rules == "cp3" and rules.float32_rescale
    assert InferenceRules(tile_size=256, pad_to_tile=True, float32_rescale=False).mask_rules == "cp4"
    # cp3 mask rules on a torch masks device: accepted (torch_rules), stored for the dynamics
    assert Segmenter(net, device="cpu", masks_device="cuda").masks_device == "cuda"
    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    # 27 / 9.45 = 2.857...: float64 200 / rescale = 69.99999, cellpose 3's float32 gives 70.0
    res = Segmenter(net, device="cpu").segment([image], diameter=9.45, compute_masks=False)[0]
    assert res.niter == cp3_niter(9.45) == 70 and int(200 / res.rescale) == 69
    # with cp4 mask rules the Segmenter passes them on (and accepts a torch masks device)
    cp4_rules = InferenceRules(tile_size=224, pad_to_tile=False, float32_rescale=True, mask_rules="cp4")
    seg = Segmenter(net, device="cpu", rules=cp4_rules, masks_device=torch.device("cpu"))
    assert seg.segment([image], diameter=27.0)[0].masks.shape == image.shape
