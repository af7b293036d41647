"""cpsam.metrics against the peers: cellpose.metrics and stardist.matching, on seeded random label pairs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cellpose import metrics as cp_metrics
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from stardist.matching import matching as sd_matching  # pure numpy/numba: no TensorFlow import

from cpsam.metrics import (
    aggregated_jaccard_index,
    assign,
    average_precision,
    binary_iou,
    error_rate,
    label_overlap,
    score_image,
)

THRESHOLDS = [0.5, 0.75, 0.9]


def ellipses(rng: np.random.Generator, shape: tuple[int, int], n: int, max_r: int) -> np.ndarray:
    """Label image with up to n overlapping random ellipses (later ones on top), ids 1..n."""
    lab = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        ry, rx = rng.integers(1, max_r + 1, 2)
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    return lab


def perturbed(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    """Shift by up to 2 px and drop ~20 % of the objects."""
    out = np.roll(lab, tuple(rng.integers(-2, 3, 2)), (0, 1)).copy()
    ids = np.unique(out)[1:]
    if ids.size:
        out[np.isin(out, rng.choice(ids, max(1, ids.size // 5)))] = 0
    return out


def scatter_ids(rng: np.random.Generator, lab: np.ndarray, dtype: type, top: int) -> np.ndarray:
    """Map ids 1..n to distinct random ids in 1..top-1 (non-consecutive), cast to dtype."""
    ids = np.unique(lab)[1:]
    lut = np.zeros(int(lab.max()) + 1, np.int64)
    lut[ids] = rng.choice(top - 1, ids.size, replace=False) + 1  # no arange(top): top may be 2**31
    return lut[lab].astype(dtype)


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One of four families: pixel noise (many ties, multi-object components), ellipses vs a
    perturbed copy, two independent ellipse sets, tiny one/few-pixel objects with scattered ids.
    10 % of sides are made empty."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    kind = seed % 4
    if kind == 0:
        true, pred = rng.integers(0, 6, shape), rng.integers(0, 6, shape)
    elif kind == 1:
        true = ellipses(rng, shape, int(rng.integers(0, 15)), 6)
        pred = perturbed(rng, true)
    elif kind == 2:
        true = ellipses(rng, shape, int(rng.integers(0, 15)), 6)
        pred = ellipses(rng, shape, int(rng.integers(0, 15)), 6)
    else:
        true = ellipses(rng, shape, int(rng.integers(0, 15)), 2)  # radius 1-2: one-pixel objects
        pred = perturbed(rng, true)
        true, pred = scatter_ids(rng, true, np.uint16, 400), scatter_ids(rng, pred, np.int32, 400)
    if rng.random() < 0.1:
        true = np.zeros_like(true)
    if rng.random() < 0.1:
        pred = np.zeros_like(pred)
    return true, pred


def cellpose_scores(true: np.ndarray, pred: np.ndarray, thresholds: list[float]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cellpose divides 0/0 for two empty images
        ap, tp, fp, fn = cp_metrics.average_precision(true.astype(np.int64), pred.astype(np.int64), thresholds)
        aji = cp_metrics.aggregated_jaccard_index([true.astype(np.int64)], [pred.astype(np.int64)])[0]
    return ap, tp, fp, fn, aji


SEEDS = range(240)


@pytest.mark.parametrize("chunk", range(4))
def test_counts_ap_and_aji_equal_cellpose(chunk: int) -> None:
    checked = 0
    for seed in SEEDS[chunk::4]:
        true, pred = random_pair(seed)
        # cellpose counts objects as len(unique) - 1, i.e. it assumes a background pixel exists;
        # give every image one (the no-background case is compared with StarDist below).
        true.flat[0] = 0
        pred.flat[0] = 0
        ap, tp, fp, fn, aji = cellpose_scores(true, pred, THRESHOLDS)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ours must never warn
            ours = score_image(true, pred, THRESHOLDS)
        for k, th in enumerate(THRESHOLDS):
            s = ours.at(th)
            assert (s.tp, s.fp, s.fn) == (tp[k], fp[k], fn[k]), (seed, th)
            if tp[k] + fp[k] + fn[k] > 0:
                assert np.float32(s.ap) == ap[k], (seed, th)  # cellpose stores float32
            else:
                assert np.isnan(ap[k]) and s.ap == 0.0  # both empty: cellpose NaN, ours 0 (StarDist)
        if np.isnan(aji):
            assert ours.aji == 0.0 and true.max() == 0 and pred.max() == 0
        else:
            assert ours.aji == pytest.approx(aji, rel=1e-12, abs=0), seed
        checked += 1
    assert checked == 60


@pytest.mark.parametrize("chunk", range(4))
def test_precision_recall_f1_matched_iou_equal_stardist(chunk: int) -> None:
    for seed in SEEDS[chunk::4]:
        true, pred = random_pair(seed)  # here including images without any background pixel
        ours = score_image(true, pred, THRESHOLDS)
        for th in THRESHOLDS:
            m = sd_matching(true, pred, thresh=th)
            s = ours.at(th)
            assert (s.tp, s.fp, s.fn) == (m.tp, m.fp, m.fn), (seed, th)
            assert (ours.n_true, ours.n_pred) == (m.n_true, m.n_pred)
            # exact: both are ratios of the same integers in float64
            assert (s.precision, s.recall, s.f1, s.ap) == (m.precision, m.recall, m.f1, m.accuracy)
            # StarDist sums IoUs in float32
            assert s.mean_matched_iou == pytest.approx(m.mean_matched_score, rel=2e-7, abs=1e-7)
            assert s.panoptic_quality == pytest.approx(m.panoptic_quality, rel=2e-7, abs=1e-7)


def test_thresholds_below_half_need_the_solve_and_still_match_cellpose() -> None:
    low = [0.1, 0.25, 0.5]
    solved = 0
    for seed in range(0, 80, 4):  # pixel-noise family: dense multi-object components
        true, pred = random_pair(seed)
        true.flat[0] = pred.flat[0] = 0
        ap, tp, fp, fn, _ = cellpose_scores(true, pred, low)
        ours_ap, ours_tp, ours_fp, ours_fn = average_precision(true, pred, low)
        np.testing.assert_array_equal(ours_tp, tp)
        np.testing.assert_array_equal(ours_fn, fn)
        np.testing.assert_array_equal(ours_fp, fp)
        ov = label_overlap(true, pred)
        above = ov.iou >= 0.1
        if above.any() and np.bincount(ov.pair_true[above]).max() > 1:
            solved += 1
    assert solved > 5  # the Hungarian path (not the shortcut) was exercised


def test_tie_at_exactly_half_counts_one_match() -> None:
    # a 2x4 object split exactly in two: each half has IoU 0.5 with it; only one can be matched
    true = np.zeros((6, 8), np.uint8)
    true[2:4, 2:6] = 1
    pred = np.zeros_like(true)
    pred[2:4, 2:4] = 5
    pred[2:4, 4:6] = 9
    ov = label_overlap(true, pred)
    np.testing.assert_array_equal(ov.iou, [0.5, 0.5])
    s = score_image(true, pred).at(0.5)
    _, tp, fp, fn, _ = cellpose_scores(true, pred, [0.5])
    assert (s.tp, s.fp, s.fn) == (1, 1, 0) == (tp[0], fp[0], fn[0])
    assert s.error_rate == 1 / 1
    assert assign(ov, 0.5).n_tp == 1


def test_hand_computed_example() -> None:
    # GT: A (4x4 = 16 px), B (2x2 = 4 px), C (one pixel). Pred: A shifted by one column, B exact,
    # a false positive D; C missed.
    true = np.zeros((10, 10), np.uint32)
    true[0:4, 0:4] = 7
    true[6:8, 6:8] = 3
    true[9, 0] = 100
    pred = np.zeros_like(true)
    pred[0:4, 1:5] = 2
    pred[6:8, 6:8] = 1
    pred[0, 9] = 4
    s = score_image(true, pred)
    iou_a = 12 / 20
    at5 = s.at(0.5)
    assert (at5.tp, at5.fp, at5.fn) == (2, 1, 1)
    assert at5.ap == 2 / 4
    assert at5.error_rate == (1 + 1) / (2 + 1)
    assert at5.precision == 2 / 3 and at5.recall == 2 / 3 and at5.f1 == 4 / 6
    assert at5.mean_matched_iou == pytest.approx((iou_a + 1) / 2)
    assert at5.panoptic_quality == pytest.approx((iou_a + 1) / (2 + 0.5 + 0.5))
    at75 = s.at(0.75)
    assert (at75.tp, at75.fp, at75.fn) == (1, 2, 2)
    assert s.aji == pytest.approx((12 + 4) / (16 + 4 + 4 + 1 + 1))
    assert s.binary_iou == pytest.approx((12 + 4) / (16 + 4 + 4 + 1 + 1))
    assert (s.n_true, s.n_pred, s.count_abs_error, s.count_rel_error) == (3, 3, 0, 0.0)
    row = s.as_row()
    assert row["error_rate@0.5"] == at5.error_rate and row["tp@0.75"] == 1 and row["aji"] == s.aji


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_any_integer_dtype_and_huge_ids_give_the_same_scores(dtype: type) -> None:
    true, pred = random_pair(5)
    ref = score_image(true.astype(np.int64), pred.astype(np.int64))
    rng = np.random.default_rng(1)
    top = {np.uint8: 255, np.int16: 32767, np.uint16: 65535}.get(dtype, 2**31 - 1)
    t2, p2 = scatter_ids(rng, true, dtype, top), scatter_ids(rng, pred, dtype, top)
    if dtype is np.uint64:  # ids far beyond any table: the sort path
        t2 = np.where(t2 > 0, t2.astype(np.uint64) + np.uint64(2**62), 0).astype(np.uint64)
    assert score_image(t2, p2) == ref


def test_empty_images_are_defined_without_warnings() -> None:
    empty = np.zeros((16, 16), np.uint16)
    objs = np.zeros((16, 16), np.uint16)
    objs[2:5, 2:5] = 1
    objs[9:12, 9:12] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = score_image(empty, empty)
        no_pred = score_image(objs, empty)
        no_gt = score_image(empty, objs)
        zero_size = score_image(np.zeros((0, 5), np.uint8), np.zeros((0, 5), np.uint8))
    for s in (both, zero_size):
        t = s.at(0.5)
        assert (t.tp, t.fp, t.fn, t.ap, t.error_rate, t.precision, t.recall, t.f1) == (0, 0, 0, 0, 0, 0, 0, 0)
        assert s.aji == 0.0 and s.binary_iou == 1.0 and s.count_rel_error == 0.0
    t = no_pred.at(0.5)
    assert (t.tp, t.fp, t.fn, t.ap, t.error_rate, t.recall) == (0, 0, 2, 0.0, 1.0, 0.0)
    assert no_pred.binary_iou == 0.0 and no_pred.count_rel_error == 1.0
    t = no_gt.at(0.5)
    assert (t.tp, t.fp, t.fn, t.ap, t.precision) == (0, 2, 0, 0.0, 0.0)
    assert t.error_rate == 2.0  # FP / max(TP + FN, 1): false positives on empty GT still count
    assert no_gt.count_abs_error == 2 and no_gt.count_rel_error == 2.0


def test_bad_inputs_raise_clear_errors() -> None:
    a = np.zeros((4, 4), np.uint16)
    with pytest.raises(ValueError, match=r"shape mismatch: ground truth \(4, 4\) vs prediction \(4, 5\)"):
        score_image(a, np.zeros((4, 5), np.uint16))
    with pytest.raises(ValueError, match="integer dtype, got float32"):
        score_image(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        score_image(a.astype(np.int32) - 1, a)
    with pytest.raises(ValueError, match="2 ground-truth images but 1"):
        average_precision([a, a], [a])


def test_average_precision_layout_matches_cellpose() -> None:
    pairs = [random_pair(s) for s in (1, 9, 25)]  # 25: empty ground truth, 9 predictions
    for t, p in pairs:
        t.flat[0] = p.flat[0] = 0
    trues, preds = [t for t, _ in pairs], [p for _, p in pairs]
    ours = average_precision(trues, preds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cellpose divides by n_min = 0 for the empty ground truth
        theirs = cp_metrics.average_precision(
            [t.astype(np.int64) for t in trues], [p.astype(np.int64) for p in preds]
        )
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape == (3, 3)
        np.testing.assert_array_equal(a.astype(np.float32), b)
    single = average_precision(trues[0], preds[0])
    assert single[0].shape == (3,)


def test_error_rate_and_binary_iou_helpers() -> None:
    assert error_rate(8, 1, 2) == 3 / 10
    assert error_rate(0, 3, 0) == 3.0
    assert error_rate(0, 0, 0) == 0.0
    a = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    b = np.array([[5, 5, 0], [0, 7, 0]], np.uint16)
    assert binary_iou(a, b) == 2 / 5
    assert aggregated_jaccard_index(a, a) == 1.0


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    true, pred = random_pair(9)
    ref = score_image(true, pred)
    assert score_image(torch.from_numpy(true), torch.from_numpy(pred.astype(np.int32))) == ref
    assert binary_iou(torch.from_numpy(true), torch.from_numpy(pred)) == ref.binary_iou


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 6)),
    arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 6)),
    st.sampled_from([0.1, 0.3, 0.5, 0.75]),
)
def test_properties_tp_is_max_matching_and_symmetric(a: np.ndarray, b: np.ndarray, th: float) -> None:
    b = np.resize(b, a.shape)
    s = score_image(a, b, [th]).at(th)
    # independent oracle: TP = maximum cardinality matching of the bipartite graph "IoU >= th"
    ov = label_overlap(a, b)
    keep = ov.iou >= th
    graph = csr_matrix((np.ones(keep.sum()), (ov.pair_true[keep], ov.pair_pred[keep])), shape=(ov.n_true, ov.n_pred))
    assert s.tp == int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    # swapping the roles swaps FP and FN and keeps the symmetric scores
    r = score_image(b, a, [th]).at(th)
    assert (r.tp, r.fp, r.fn, r.ap, r.f1) == (s.tp, s.fn, s.fp, s.ap, s.f1)
    # renaming ids (a permutation, keeping 0) changes nothing
    perm = np.array([0, 6, 4, 5, 1, 3, 2], np.uint8)
    assert score_image(perm[a], b, [th]) == score_image(a, b, [th])


def test_eval_metrics_is_the_cpsam_implementation() -> None:
    """`from eval.metrics import score_image` (the documented path for scripts) gives the one implementation."""
    import importlib

    import cpsam.metrics

    legacy = importlib.import_module("eval.metrics")  # never bind the name `eval` (the builtin)
    for name in cpsam.metrics.__all__:
        assert getattr(legacy, name) is getattr(cpsam.metrics, name)
