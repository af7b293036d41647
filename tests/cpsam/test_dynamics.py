"""cpsam.dynamics against the installed cellpose 4.2 `dynamics` on real masks and golden flows.

Kept fast: cellpose's own diffusion takes seconds per image on 2 cores, so comparisons with it
use crops; whole golden images are in the slow test and in benchmarks/bench_dynamics.py.
"""

from __future__ import annotations

import pickle

import fastremap
import numpy as np
import pytest
import tifffile
import torch
from cellpose import dynamics as cpd
from cellpose import metrics
from cellpose import utils as cpu_utils
from conftest import load_golden_flows, read_golden_masks, read_shared_masks

from cpsam import dynamics
from cpsam.io import InputFileError

CPU = torch.device("cpu")
MASK_FILES = {  # key -> (folder, image name) of manual masks in ../shared/data
    "bact": ("bact_phase_neurips22", "neurips22_cell_00528"),
    "hela": ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_02_t075"),
    "tissue": ("tissue_multiplex_neurips22", "neurips22_cell_00849"),
    "gbm": ("he_gbm40_emory", "gbm40_20"),
    "mother": ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA"),
    "u373": ("phase_ctc_U373", "PhC-C2DH-U373_01_t021"),
}
GOLDEN = ["neurips22_cell_00849", "cpm15_image01", "usiigaci_set1", "Fluo-N2DL-HeLa_01_t013"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """cellpose's torch loops crawl when 2 OpenMP threads fight other jobs for 2 cores. numba's OpenMP
    layer resets the thread count when it starts: start it first (a parallel kernel), then set one."""
    dynamics.masks_to_flows(np.ones((8, 8), np.int32))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_masks(key: str) -> np.ndarray:
    return read_shared_masks(*MASK_FILES[key])


def crop(m: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(m[y : y + size, x : x + size])


def cellpose_flows(masks: np.ndarray) -> np.ndarray:
    """cellpose's unit flows for any labels (it needs consecutive ids, so renumber first)."""
    lab, _ = fastremap.renumber(np.ascontiguousarray(masks), in_place=False)
    return cpd.masks_to_flows_gpu(lab.astype(np.int64), device=CPU)[0].astype(np.float32)


def cosine_in_objects(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    both0 = (na == 0) & (nb == 0)
    return np.where(both0, 1.0, (a * b).sum(0) / np.maximum(na * nb, 1e-30))[inside]


def golden(name: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_golden_flows(name)
    return d["dP"], d["cellprob"]


def ap50(true: np.ndarray, pred: np.ndarray) -> float:
    return float(metrics.average_precision([true.astype(np.int32)], [pred.astype(np.int32)])[0][0, 0])


# ---------------------------------------------------------------- masks -> flows


@pytest.mark.parametrize(
    ("key", "y", "x", "size"),
    [("bact", 0, 0, 200), ("hela", 300, 500, 160), ("tissue", 100, 200, 160), ("mother", 400, 0, 160)],
)
def test_masks_to_flows_bit_identical_to_cellpose(key: str, y: int, x: int, size: int) -> None:
    m = crop(real_masks(key), y, x, size)  # crops cut objects at the border: covered as well
    assert m.max() > 3
    ours = dynamics.masks_to_flows(m)
    ref = cellpose_flows(m)
    assert ours.dtype == np.float32 and ours.shape == (2, *m.shape)
    cos = cosine_in_objects(ours, ref, m > 0)
    assert cos.min() >= 0.99
    np.testing.assert_array_equal(ours, ref)
    assert np.all(ours[:, m == 0] == 0)
    norm = np.linalg.norm(ours, axis=0)[m > 0]
    assert np.mean(np.abs(norm - 1) < 1e-5) > 0.99  # unit vectors (0 only at exact symmetry points)


def test_masks_to_flows_ids_need_not_be_consecutive() -> None:
    m = crop(real_masks("tissue"), 0, 0, 128).astype(np.int64)
    sparse = np.where(m > 0, m * 7919 + 4_000_000_000, 0).astype(np.uint32)  # huge, gappy ids
    np.testing.assert_array_equal(dynamics.masks_to_flows(sparse), cellpose_flows(m))
    # and signed / small dtypes give the same flows
    np.testing.assert_array_equal(dynamics.masks_to_flows(m.astype(np.int32)), cellpose_flows(m))


def test_masks_to_flows_disconnected_object_and_border() -> None:
    m = np.zeros((60, 70), np.uint16)
    m[0:20, 0:25] = 3  # touches two borders
    m[30:50, 40:70] = 3  # second piece of the same id
    m[25:45, 5:30] = 9
    m[52:60, 0:8] = 1
    ours = dynamics.masks_to_flows(m)
    np.testing.assert_array_equal(ours, cellpose_flows(m))
    # the source lies in one piece; the other piece has no heat and gets zero flow, as in cellpose
    assert np.abs(ours[:, m == 3]).sum() > 0


def test_masks_to_flows_empty_and_bad_input() -> None:
    assert not dynamics.masks_to_flows(np.zeros((17, 9), np.uint8)).any()
    assert dynamics.masks_to_flows(np.zeros((17, 9), np.uint8)).shape == (2, 17, 9)
    with pytest.raises(ValueError, match="integer"):
        dynamics.masks_to_flows(np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="integer"):
        dynamics.masks_to_flows(np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="2-D"):
        dynamics.masks_to_flows(np.ones((2, 8, 8), np.uint16))
    with pytest.raises(ValueError, match="negative"):
        dynamics.masks_to_flows(-np.ones((8, 8), np.int16))


def test_masks_to_flows_torch_path_matches_numba() -> None:
    """device="cpu" is the numba path; a GPU device runs `torch_rules.unit_flows`, here on the CPU."""
    m = crop(real_masks("gbm"), 200, 200, 128)
    ours = dynamics.masks_to_flows(m)
    np.testing.assert_array_equal(dynamics.masks_to_flows(m, device="cpu"), ours)
    lab, n = dynamics._consecutive(m)
    tor = dynamics.torch_rules.unit_flows(torch.from_numpy(lab.astype(np.int64)), n, False).float().numpy()
    assert cosine_in_objects(ours, tor, m > 0).min() >= 0.999999
    np.testing.assert_allclose(tor, ours, atol=1e-6)


# ---------------------------------------------------------------- flows -> masks


def test_flow_error_equals_cellpose() -> None:
    dP, cp = golden("neurips22_cell_00849")
    dP, cp = dP[:, :160, :160], cp[:160, :160]
    masks = dynamics.flows_to_masks(dP, cp, flow_threshold=0.0, min_size=0, exact=True)
    ref, _ = cpd.flow_error(masks.astype(np.int64), dP, device=CPU)
    ours = dynamics.flow_error(masks, dP)
    assert len(ours) == masks.max() > 10
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "y", "x", "size"), [("neurips22_cell_00849", 100, 100, 256),
                                                      ("cpm15_image01", 0, 0, 240),
                                                      ("usiigaci_set1", 300, 300, 256)])
def test_flows_to_masks_matches_cellpose_on_golden_flows(name: str, y: int, x: int, size: int) -> None:
    dP, cp = golden(name)
    dP = np.ascontiguousarray(dP[:, y : y + size, x : x + size])
    cp = np.ascontiguousarray(cp[y : y + size, x : x + size])
    ref = cpd.resize_and_compute_masks(dP, cp, niter=200, device=CPU)
    assert ref.max() > 3
    exact = dynamics.flows_to_masks(dP, cp, exact=True)
    np.testing.assert_array_equal(exact, ref)  # bit for bit, labels included
    np.testing.assert_array_equal(dynamics.flows_to_masks(dP, cp), ref)  # exact is the default
    fast = dynamics.flows_to_masks(dP, cp, exact=False)  # opt-in: trajectories stop once settled
    assert fast.dtype == np.uint16 and fast.shape == cp.shape
    assert abs(int(fast.max()) - int(ref.max())) <= 0.01 * ref.max()
    assert ap50(ref, fast) >= 0.99


@pytest.mark.parametrize("rules", ["cp4", "cp3"])
def test_flows_to_masks_thresholds_equals_one_call_per_threshold(rules: str) -> None:
    """Real golden flows (cellpose on a phase-contrast crop), noise added so the QC drops masks at some thresholds."""
    dP, cp = golden("usiigaci_set1")
    dP = np.ascontiguousarray(dP[:, 300:556, 300:556]) + np.random.default_rng(0).normal(0, 1.5, (2, 256, 256))
    cp = np.ascontiguousarray(cp[300:556, 300:556])
    thresholds = [0.0, 0.2, 0.4, 0.8]
    many = dynamics.flows_to_masks_thresholds(dP.astype(np.float32), cp, thresholds, rules=rules)
    one_by_one = [dynamics.flows_to_masks(dP.astype(np.float32), cp, flow_threshold=t, rules=rules)
                  for t in thresholds]
    for a, b in zip(many, one_by_one, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({int(m.max()) for m in many}) > 1  # the thresholds made a difference
    empty = dynamics.flows_to_masks_thresholds(dP.astype(np.float32), np.full_like(cp, -5.0), [0.4, 0.8])
    assert [int(m.max()) for m in empty] == [0, 0]


def test_follow_flows_positions_equal_cellpose() -> None:
    dP, cp = golden("cpm15_image01")
    fg = cp > 0
    ref = cpd.follow_flows(dP * fg / 5.0, inds=np.nonzero(fg), niter=200, device=CPU).int().numpy()
    np.testing.assert_array_equal(dynamics.follow_flows(dP, fg, niter=200), ref)
    fast = dynamics.follow_flows(dP, fg, niter=200, exact=False)
    assert (fast != ref).any(axis=0).mean() < 0.01


def test_round_trip_recovers_real_objects() -> None:
    """masks -> unit flows x5 -> masks (cellprob +-5, niter 200, flow QC on, no size filter)."""
    tp = fp = fn = 0
    for key in ["hela", "gbm", "u373", "tissue"]:
        m = real_masks(key)
        dP = 5.0 * dynamics.masks_to_flows(m)
        cp = np.where(m > 0, 5.0, -5.0).astype(np.float32)
        out = dynamics.flows_to_masks(dP, cp, min_size=0)
        ap, t, p, n = metrics.average_precision([m.astype(np.int32)], [out.astype(np.int32)])
        tp, fp, fn = tp + t[0, 0], fp + p[0, 0], fn + n[0, 0]
        if key != "tissue":
            assert out.max() == m.max() and ap[0, 0] == 1.0, key  # every object, one mask each
        else:
            # 4 of 187 touching, irregular cells are lost: cellpose's own round trip (bit-identical
            # algorithm, see the bench) loses the same ones (flow QC; 1 lost with QC off)
            assert ap[0, 0] >= 0.96, ap
    assert tp / (tp + fp + fn) >= 0.99  # pooled AP@0.5 over 719 real objects


def test_flows_to_masks_no_foreground_and_bad_shapes() -> None:
    out = dynamics.flows_to_masks(np.zeros((2, 30, 40), np.float32), -np.ones((30, 40), np.float32))
    assert out.shape == (30, 40) and out.dtype == np.uint16 and not out.any()
    with pytest.raises(ValueError, match="dP"):
        dynamics.flows_to_masks(np.zeros((3, 30, 40), np.float32), np.zeros((30, 40), np.float32))


def test_batch_and_torch_path_match_numba_path() -> None:
    dP, cp = golden("neurips22_cell_00849")
    tiles = [(dP[:, :192, :192], cp[:192, :192]), (dP[:, 192:384, 100:292], cp[192:384, 100:292]),
             (dP[:, :100, :150], cp[:100, :150])]
    dPs = [np.ascontiguousarray(t[0]) for t in tiles]
    cps = [np.ascontiguousarray(t[1]) for t in tiles]
    expect = [dynamics.flows_to_masks(a, b, exact=True) for a, b in zip(dPs, cps, strict=True)]
    fast = dynamics.flows_to_masks_batch(dPs, cps)
    on_torch = dynamics.flows_to_masks_batch(dPs, cps, device="cpu")  # grid_sample + torch QC
    for e, f, t in zip(expect, fast, on_torch, strict=True):
        assert f.shape == e.shape == t.shape
        assert ap50(e, f) >= 0.99
        np.testing.assert_array_equal(t, e)  # torch CPU grid_sample: same positions bit for bit


def test_fill_holes_and_remove_small_masks_equals_cellpose() -> None:
    m = crop(real_masks("hela"), 200, 300, 200).astype(np.uint16)
    rng = np.random.default_rng(0)
    m[rng.random(m.shape) < 0.05] = 0  # punch holes
    m[10:12, 10:12] = m.max() + 1  # a 4-pixel object
    ref = cpu_utils.fill_holes_and_remove_small_masks(m.copy(), min_size=15)
    ours = dynamics.fill_holes_and_remove_small_masks(m, min_size=15)
    np.testing.assert_array_equal(ours, ref)
    assert ours.max() < m.max()


# ---------------------------------------------------------------- many images, flow cache


def test_masks_to_flows_many_and_write_flow_cache(tmp_path) -> None:
    masks = [crop(real_masks("tissue"), 0, 0, 96), crop(real_masks("bact"), 50, 50, 80),
             np.zeros((20, 30), np.uint16)]
    expect = [dynamics.masks_to_flows(m) for m in masks]
    got = dynamics.masks_to_flows_many(masks, workers=2, progress=False)
    for e, g in zip(expect, got, strict=True):
        np.testing.assert_array_equal(g, e)
    src = []
    for i, m in enumerate(masks[:2]):
        p = tmp_path / f"m{i}.tif"
        tifffile.imwrite(p, m)
        src.append(p)
    outs = [tmp_path / "flows" / f"m{i}.tif" for i in range(2)]
    written = dynamics.write_flow_cache(src, outs, workers=1, progress=False)
    assert written == outs
    for e, p in zip(expect[:2], outs, strict=True):
        f = tifffile.imread(p)
        assert f.dtype == np.float32 and f.shape == e.shape
        np.testing.assert_array_equal(f, e)
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, np.ones((2, 3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(InputFileError, match="bad.tif"):
        dynamics.write_flow_cache([src[0], bad], [tmp_path / "f" / "ok.tif", tmp_path / "f" / "bad.tif"],
                                  workers=1, progress=False)
    # the error survives the trip back from a worker process
    err = pickle.loads(pickle.dumps(InputFileError(bad, "label image must be 2-D")))
    assert isinstance(err, InputFileError) and "bad.tif" in str(err)
    assert not (tmp_path / "f" / "bad.tif").exists()
    assert not list((tmp_path / "f").glob(".*part*"))  # no partial files left


# ---------------------------------------------------------------- slow: whole golden images


@pytest.mark.slow
@pytest.mark.parametrize("name", GOLDEN)
def test_flows_to_masks_whole_golden_images(name: str) -> None:
    dP, cp = golden(name)
    ref = cpd.resize_and_compute_masks(dP, cp, niter=200, device=CPU)
    np.testing.assert_array_equal(dynamics.flows_to_masks(dP, cp, exact=True), ref)
    ours = dynamics.flows_to_masks(dP, cp)
    assert ap50(ref, ours) >= 0.99
    assert abs(int(ours.max()) - int(ref.max())) <= 0.01 * ref.max()
    gold = read_golden_masks(name)
    assert ap50(gold, ours) >= 0.95  # cellpose 3.1's own pipeline; same dynamics up to float order
