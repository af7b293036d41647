"""A student's own flow threshold (distill.calibrate): chosen against the teacher's masks, recorded in model.pt,
applied by `Segmenter`, `cpsam segment` and the exports when no threshold is given."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import label_squares, save_fastnet_student, shared_path

from cpsam import io
from cpsam.dynamics import masks_to_flows
from cpsam.models import load_model
from cpsam.models.loading import read_checkpoint
from cpsam.segment import DEFAULT_FLOW_THRESHOLD, Segmenter, calibrated_flow_threshold, recorded_flow_threshold
from distill import export
from distill.calibrate import (
    CALIBRATION_FILE,
    FLOW_THRESHOLD_GRID,
    FlowThresholdCalibration,
    calibrate_flow_threshold,
    flow_threshold_scores,
    record_flow_threshold,
)

SQUARES = label_squares((96, 96), [(4 + 30 * i, 4 + 30 * j) for i in range(3) for j in range(3)], 22)


def _noisy_outputs(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The network outputs of a perfect copy of SQUARES' flows plus seeded Gaussian noise (5x scale)."""
    flows = masks_to_flows(SQUARES)[-2:]
    noise = np.random.default_rng(0).normal(0, sigma, flows.shape).astype(np.float32)
    return 5 * flows + noise, np.where(SQUARES > 0, 5.0, -5.0).astype(np.float32)


def test_noisy_flows_lose_masks_under_the_teachers_threshold_and_keep_them_under_a_higher_one():
    clean = flow_threshold_scores(*_noisy_outputs(0.0), 200, SQUARES, FLOW_THRESHOLD_GRID, "cp4")
    assert clean.tolist() == [1.0] * len(FLOW_THRESHOLD_GRID)
    noisy = flow_threshold_scores(*_noisy_outputs(2.0), 200, SQUARES, FLOW_THRESHOLD_GRID, "cp4")
    # at 0.4 the QC removes one of the nine squares (AP 8/9); from 0.6 on all nine are kept
    assert noisy[0] == pytest.approx(8 / 9) and noisy[FLOW_THRESHOLD_GRID.index(0.6):].min() == 1.0
    much = flow_threshold_scores(*_noisy_outputs(3.0), 200, SQUARES, (0.4, 0.8, 1.2), "cp4")
    assert much[0] < much[1] < much[2] == 1.0


def test_the_teacher_calibrated_against_its_own_masks_keeps_cellposes_threshold(cyto0_file):
    """cyto_0 scored against its own masks at 0.4 agrees perfectly there, so the calibration keeps 0.4; with the
    check off (0.0) its masks differ (the scores are real matches, not a constant)."""
    image = io.read_image(shared_path("data", "fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_02_t075_img.tif"))
    crop = np.ascontiguousarray(image[250:474, 400:624])
    teacher = load_model(cyto0_file)
    masks = Segmenter(teacher).segment([crop], diameter=25.0, channels=[0, 0])[0].masks
    assert masks.max() > 10
    calibration = calibrate_flow_threshold(teacher, [crop], [masks], [25.0], channels=[0, 0], grid=(0.0, 0.4, 0.8))
    assert calibration.flow_threshold == 0.4 and calibration.n_images == 1
    assert calibration.ap50[0.4] == 1.0 and calibration.ap50[0.0] < 1.0  # 0.0 comes first: it would win a tie
    with pytest.raises(ValueError, match="at least one"):
        calibrate_flow_threshold(teacher, [], [], [], grid=(0.4,))
    with pytest.raises(ValueError, match="threshold >= 0"):
        calibrate_flow_threshold(teacher, [crop], [masks], [25.0], grid=(-1.0,))


def test_a_recorded_threshold_is_what_segment_and_the_export_apply(tmp_path, monkeypatch):
    path = save_fastnet_student(tmp_path / "model.pt")
    plain = load_model(path)
    assert recorded_flow_threshold(plain) == DEFAULT_FLOW_THRESHOLD and calibrated_flow_threshold(plain) is None
    calibration = FlowThresholdCalibration(0.7, {0.4: 0.5, 0.7: 0.6}, 3)
    record_flow_threshold(path, calibration, "a test")
    ckpt = read_checkpoint(path)
    assert ckpt["inference"]["mask_thresholds"] == {"flow_threshold": 0.7, "source": "a test"}
    with open(tmp_path / CALIBRATION_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(float(r["flow_threshold"]), r["chosen"]) for r in rows] == [(0.4, "0"), (0.7, "1")]
    model = load_model(path)
    assert recorded_flow_threshold(model) == 0.7 and calibrated_flow_threshold(model) == 0.7
    seg = Segmenter(model)
    assert seg.flow_threshold == 0.7
    assert export.build_segmenter(model).flow_threshold == 0.7
    # Segmenter hands the recorded threshold to the dynamics unless the call gives one
    import cpsam.dynamics as dynamics

    seen: list[float] = []
    real = dynamics.flows_to_masks

    def spy(*args, **kwargs):
        seen.append(kwargs["flow_threshold"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dynamics, "flows_to_masks", spy)
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    seg.segment([image], diameter=27.0)
    seg.segment([image], diameter=27.0, flow_threshold=0.0)
    Segmenter(plain).segment([image], diameter=27.0)
    assert seen == [0.7, 0.0, DEFAULT_FLOW_THRESHOLD]
    model.inference_record = {"mask_thresholds": {"flow_threshold": -1}}
    with pytest.raises(ValueError, match="must be a number >= 0"):
        recorded_flow_threshold(model)
