"""cpsam.metrics on real masks: the golden cellpose-3 outputs and a 2048x2048 mosaic of manual masks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cellpose import metrics as cp_metrics
from conftest import read_golden_masks, read_shared_masks, shared_path
from stardist.matching import matching as sd_matching

from benchmarks.bench_metrics import build_case
from cpsam.metrics import score_image

# AP@0.5 of the golden cellpose-3 masks against the manual masks, from shared/golden/README.md.
README_AP50 = {
    "Fluo-N2DL-HeLa_01_t013": 0.855,
    "usiigaci_set1": 0.847,
    "neurips22_cell_00849": 0.183,
    "cpm15_image01": 0.038,
}


def golden_pairs(cases: list[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, manual masks, cellpose 3's masks) of each golden case."""
    return [(case["name"], read_shared_masks(case["folder"], case["name"]), read_golden_masks(case["name"]))
            for case in cases]


def test_golden_masks_score_the_readme_ap_values(cyto0_golden_cases: list[dict]) -> None:
    pairs = golden_pairs(cyto0_golden_cases)
    assert {name for name, _, _ in pairs} == set(README_AP50)
    for name, gt, pred in pairs:
        s = score_image(gt, pred)
        assert round(s.at(0.5).ap, 3) == README_AP50[name], name
        ap, tp, fp, fn = cp_metrics.average_precision(gt.astype(np.int64), pred.astype(np.int64))
        for k, th in enumerate((0.5, 0.75, 0.9)):
            t = s.at(th)
            assert (t.tp, t.fp, t.fn) == (tp[k], fp[k], fn[k]), (name, th)
            assert np.float32(t.ap) == ap[k]
            m = sd_matching(gt, pred, thresh=th)
            assert (t.precision, t.recall, t.f1) == (m.precision, m.recall, m.f1)
            assert t.mean_matched_iou == pytest.approx(m.mean_matched_score, rel=1e-6)
        aji = cp_metrics.aggregated_jaccard_index([gt.astype(np.int64)], [pred.astype(np.int64)])[0]
        assert s.aji == pytest.approx(aji, rel=1e-12)


def test_mosaic_of_real_masks_equals_cellpose() -> None:
    # 1024x1024 version of the benchmark case (~500 objects, shifted / dropped / split / shuffled ids)
    gt, pred = build_case(shared_path("data"), size=1024)
    assert len(np.unique(gt)) > 400 and pred.max() > len(np.unique(pred))  # non-consecutive prediction ids
    s = score_image(gt, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap, tp, fp, fn = cp_metrics.average_precision(gt.astype(np.int64), pred.astype(np.int64))
        aji = cp_metrics.aggregated_jaccard_index([gt.astype(np.int64)], [pred.astype(np.int64)])[0]
    for k, th in enumerate((0.5, 0.75, 0.9)):
        t = s.at(th)
        assert (t.tp, t.fp, t.fn) == (tp[k], fp[k], fn[k])
        assert np.float32(t.ap) == ap[k]
    assert s.aji == pytest.approx(aji, rel=1e-12)
    assert 0.5 < s.at(0.5).ap < 1.0  # the perturbation leaves real work for the matcher
