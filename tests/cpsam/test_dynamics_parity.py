"""numba vs torch: the two implementations of each mask rule set (cp3, cp4) of `cpsam.dynamics`.

`cpsam.dynamics` runs its numba kernels for device None / "cpu" and `cpsam.dynamics.torch_rules`
on any other torch device (and inside `cpsam distill export` files). Here the torch rules run on
the CPU torch device and must give the numba masks label for label, on real network flows: the
golden cyto_0 flows of ../shared/golden/cellpose3_cyto0 (cellpose 3.1.1.2's own outputs), cropped
to keep each test at a few seconds.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import tifffile
import torch
from conftest import shared_path

from cpsam import dynamics
from cpsam.dynamics import torch_rules

# (golden case, crop top, crop left, side): crops holding 10-16 masks each. 3T3 (usiigaci_set1, the case
# where the two rule sets give different masks) has 60 px cells, whose QC diffusion is slow in torch on a
# CPU: its crop is in the Euler / seeding test only.
CROPS = [("Fluo-N2DL-HeLa_01_t013", 448, 64, 192), ("neurips22_cell_00849", 0, 192, 192),
         ("cpm15_image01", 0, 448, 192)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Two OpenMP threads fighting other jobs for two cores slow the torch loops down many times. numba's
    OpenMP layer resets the thread count when it starts: start it first (a parallel kernel), then set one."""
    dynamics.masks_to_flows(np.ones((8, 8), np.int32))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@cache
def _case(name: str) -> dict:
    cases = json.loads(shared_path("golden", "cellpose3_cyto0", "cases.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == name)


def _niter(name: str) -> int:
    """cellpose 3.1.1.2's niter for the golden case: float32 1 / (27 / diameter) * 200, truncated."""
    rescale = np.float32(27.0) / np.float32(_case(name)["diameter"])
    return int(np.float32(1.0) / rescale * np.float32(200.0))


@cache
def _flows(name: str, top: int, left: int, side: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """(dP (2, side, side) float32, cellprob (side, side) float32) crop of a golden cyto_0 output."""
    data = np.load(shared_path("golden", "cellpose3_cyto0", f"{name}_flows.npz"))
    dP = np.ascontiguousarray(data["dP"][:, top : top + side, left : left + side], dtype=np.float32)
    cellprob = np.ascontiguousarray(data["cellprob"][top : top + side, left : left + side], dtype=np.float32)
    return dP, cellprob


def _masks(name: str, top: int, left: int, side: int = 192) -> np.ndarray:
    """The golden cellpose 3 masks on the crop, renumbered 1..N (int32)."""
    m = tifffile.imread(shared_path("golden", "cellpose3_cyto0", f"{name}_masks.tif"))[top : top + side,
                                                                                       left : left + side]
    _, inverse = np.unique(m, return_inverse=True)
    return inverse.reshape(m.shape).astype(np.int32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("rules", ["cp3", "cp4"])
@pytest.mark.parametrize(("name", "top", "left", "side"), CROPS)
def test_torch_rules_give_the_numba_masks_on_real_flows(name: str, top: int, left: int, side: int,
                                                        rules: str) -> None:
    """Both paths of `flows_to_masks` at the golden case's settings: identical labels."""
    dP, cellprob = _flows(name, top, left, side)
    case = _case(name)
    kw = dict(niter=_niter(name), cellprob_threshold=case["cellprob_threshold"],
              flow_threshold=case["flow_threshold"], min_size=case["min_size"])
    want = dynamics.flows_to_masks(dP, cellprob, rules=rules, **kw)
    assert want.max() >= 8, (name, want.max())  # real cells, not an empty agreement
    # the public API's torch path (what masks_device="cuda" runs), here on the CPU torch device
    got = dynamics.flows_to_masks_batch([dP], [cellprob], rules=rules, device="cpu", **kw)[0]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rules", ["cp3", "cp4"])
def test_torch_rules_equal_numba_at_other_thresholds(rules: str) -> None:
    """Lower / higher cellprob threshold, looser QC, larger size filter, no QC, no size filter: the paths agree."""
    dP, cellprob = _flows("cpm15_image01", 0, 448)
    for cellprob_threshold, flow_threshold, min_size in ((-0.5, 0.8, 30), (0.5, 0.0, 15), (0.0, 0.4, 0),
                                                         (1.0, 0.6, 15)):
        kw = dict(niter=150, cellprob_threshold=cellprob_threshold, flow_threshold=flow_threshold,
                  min_size=min_size)
        want = dynamics.flows_to_masks(dP, cellprob, rules=rules, **kw)
        got = torch_rules.flows_to_masks(_t(dP), _t(cellprob), 150, cellprob_threshold, flow_threshold, min_size,
                                         0.4, rules)
        assert want.max() >= 8
        np.testing.assert_array_equal(got.numpy(), want.astype(np.int64), err_msg=f"{rules} {kw}")


def test_batched_torch_path_mixes_sizes_and_empty_images() -> None:
    """Images of two sizes and one without foreground, batched: each equals its numba masks."""
    dP, cellprob = _flows("neurips22_cell_00849", 0, 192)
    dPs = [dP, dP[:, :100, :150], dP[:, 50:150, 20:170], dP]
    cps = [cellprob, cellprob[:100, :150], cellprob[50:150, 20:170], -np.abs(cellprob) - 1]
    dPs = [np.ascontiguousarray(a) for a in dPs]
    cps = [np.ascontiguousarray(a) for a in cps]
    for rules in ("cp3", "cp4"):
        want = [dynamics.flows_to_masks(a, b, niter=222, rules=rules) for a, b in zip(dPs, cps, strict=True)]
        got = dynamics.flows_to_masks_batch(dPs, cps, niter=222, rules=rules, device="cpu")
        assert want[3].max() == 0 and want[0].max() >= 8
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("rules", ["cp3", "cp4"])
def test_torch_euler_steps_equal_numba_positions(rules: str) -> None:
    dP, cellprob = _flows("usiigaci_set1", 64, 192, 256)
    fg = cellprob > 0
    want = dynamics.follow_flows(dP, fg, 300, rules=rules)
    if rules == "cp3":
        got = torch_rules.euler_cp3(_t(dP), _t(fg), 300)
    else:
        got = torch_rules.euler_cp4(_t(dP)[None], _t(fg)[None], 300)[0]
    np.testing.assert_array_equal(got.numpy(), want.astype(np.int64))
    # seeding (the same in both rule sets) from those positions
    np.testing.assert_array_equal(torch_rules.seed_labels(got, _t(fg)).numpy(),
                                  dynamics.get_masks(want, fg).astype(np.int64))


@pytest.mark.parametrize("rules", ["cp3", "cp4"])
def test_torch_unit_flows_and_flow_errors_equal_numba(rules: str) -> None:
    """The QC's re-diffused flows and per-mask errors, on real masks with a label gap (absent label 3)."""
    masks = _masks("cpm15_image01", 0, 448)
    masks[masks == 3] = 0
    n = int(masks.max())
    assert n >= 15
    dP, _ = _flows("cpm15_image01", 0, 448)
    mu = torch_rules.unit_flows(_t(masks.astype(np.int64)), n, rules == "cp3").numpy()
    want_mu = dynamics.masks_cp3.unit_flows(masks, n) if rules == "cp3" else dynamics.flows_numba.flows_numba(masks, n)
    np.testing.assert_allclose(mu, want_mu, rtol=0, atol=1e-12)
    err = torch_rules.flow_errors(_t(masks.astype(np.int64)), _t(dP), n, rules == "cp3").numpy()
    want_err = dynamics.flow_error(masks, dP, rules=rules)
    np.testing.assert_allclose(err, want_err, rtol=1e-9, atol=1e-15)  # NaN (cp3) / 0 (cp4) at label 3 on both
    assert (np.isnan(err[2]) if rules == "cp3" else err[2] == 0.0)


@pytest.mark.parametrize("rules", ["cp3", "cp4"])
def test_torch_hole_filling_and_small_masks_equal_numba(rules: str) -> None:
    """Holes (one holding another mask, one open to the outside only diagonally), small masks, label gaps."""
    masks = np.zeros((40, 48), np.int64)
    masks[2:14, 2:14] = 1
    masks[6:9, 6:9] = 0  # a hole of 9 px
    masks[2:14, 20:34] = 2
    masks[5:10, 24:29] = 5  # a mask inside mask 2's hole: absorbed
    masks[20:30, 2:12] = 3
    masks[20, 2] = 0  # a corner notch: not a hole
    masks[24:26, 24:26] = 7  # 4 px: too small
    masks[30:38, 30:40] = 8
    masks[33, 34] = 0  # a one-pixel hole
    want = dynamics.fill_holes_and_remove_small_masks(masks.astype(np.uint16), min_size=15, rules=rules)
    cp3 = rules == "cp3"
    got = torch_rules.drop_small(torch_rules.fill_holes(torch_rules.drop_small(_t(masks), 15, cp3)), 15, cp3)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.int64))
    assert want[7, 7] == want[3, 3] and want[7, 26] == want[3, 21] and want[33, 34] == want[31, 31]


def test_torch_rules_create_every_tensor_on_the_input_device() -> None:
    """What lets them run on a GPU: with "meta" as the default device, a tensor made without
    `device=` would land there and fail against the CPU inputs."""
    dP, cellprob = _flows("cpm15_image01", 0, 448)
    masks = _masks("cpm15_image01", 0, 448)
    want = {r: dynamics.flows_to_masks(dP, cellprob, niter=60, rules=r, min_size=0) for r in ("cp3", "cp4")}
    with torch.device("meta"):
        for rules in ("cp3", "cp4"):
            got = torch_rules.flows_to_masks(_t(dP), _t(cellprob), 60, 0.0, 0.4, 0, 0.4, rules)
            assert got.device.type == "cpu"
            np.testing.assert_array_equal(got.numpy(), want[rules].astype(np.int64))
            err = torch_rules.flow_errors(_t(masks.astype(np.int64)), _t(dP), int(masks.max()), rules == "cp3")
            assert err.device.type == "cpu"
        filled = torch_rules.fill_holes(torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]], device="cpu"))
        assert filled.device.type == "cpu" and bool((filled == 1).all())


def test_torch_rules_compile_to_torchscript() -> None:
    """The export compiles them into its file: scripted, they give the eager masks."""
    dP, cellprob = _flows("neurips22_cell_00849", 0, 192)
    scripted = torch.jit.script(torch_rules.flows_to_masks)
    for rules in ("cp3", "cp4"):
        want = torch_rules.flows_to_masks(_t(dP), _t(cellprob), 100, 0.0, 0.4, 15, 0.4, rules)
        got = scripted(_t(dP), _t(cellprob), 100, 0.0, 0.4, 15, 0.4, rules)
        assert int(want.max()) >= 8
        assert torch.equal(got, want), rules
