"""`cpsam eval` end to end: real golden masks, compare mode, bad/missing files, exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from cpsam.cli import main
from cpsam.io import write_labels


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_eval_listed_in_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out


def test_golden_predictions_against_shared_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, gt = shared_path("golden", "cellpose3_cyto0"), shared_path("data")
    out = tmp_path / "rep" / "report.csv"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = {r["dataset"]: r for r in read_csv(out.with_name("report_summary.csv"))}
    expected = {
        "fluo_nuclei_ctc_N2DL-HeLa": 0.855,
        "phase_usiigaci_3t3": 0.847,
        "tissue_multiplex_neurips22": 0.183,
        "he_miccai2015_cpm": 0.038,
    }
    assert set(summary) == {*expected, "all"}
    for dataset, ap in expected.items():
        assert round(float(summary[dataset]["ap@0.5"]), 3) == ap
    assert float(summary["all"]["ap@0.5"]) == pytest.approx(np.mean([0.8548, 0.8472, 0.1832, 0.0379]), abs=1e-3)
    assert "| fluo_nuclei_ctc_N2DL-HeLa | 1 | 59 | 56 | 0.8548 |" in captured.out
    # every manifest image's mask, plus the raw NeurIPS sample's `_label.tiff`, less the 4 that have predictions
    manifest = json.loads((gt / "manifest.json").read_text())
    n_gt = len(manifest) + len(list((gt / "raw-samples").rglob("*_label.tif*")))
    assert f"4 of 4 pairs scored; {n_gt - 4} ground-truth files without prediction" in captured.out
    assert "Fluo-N2DL-HeLa_01_t052_masks.tif" in captured.err  # missing predictions are listed
    md = out.with_name("report.md").read_text()
    assert "## Summary" in md and "## Problems" in md and "usiigaci_set10_masks.tif" in md
    assert len(read_csv(out)) == 4
    png = out.with_name("report_error_rate.png")
    assert png.stat().st_size > 10_000


def _write_set(root: Path, labels: dict[str, np.ndarray]) -> None:
    for name, lab in labels.items():
        write_labels(root / name, lab)


def _squares(n: int, shift: int = 0) -> np.ndarray:
    lab = np.zeros((32, 64), np.uint16)
    for i in range(n):
        lab[4:12, 8 * i + shift : 8 * i + 6 + shift] = i + 1
    return lab


def test_bad_missing_and_extra_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _write_set(gt, {"a_masks.tif": _squares(5), "b_masks.tif": _squares(4), "c_masks.tif": _squares(3)})
    _write_set(pred, {"a_cp_masks.tif": _squares(5, shift=1), "d_cp_masks.tif": _squares(2)})
    (pred / "b_cp_masks.tif").write_bytes(b"not a tiff")
    out = tmp_path / "r.csv"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Files that could not be scored (1)" in err and "b_cp_masks.tif: cannot be read as an image" in err
    assert "Ground-truth files without a prediction (1)" in err and "c_masks.tif" in err
    assert "Predictions without a ground-truth file (1)" in err and "d_cp_masks.tif" in err
    rows = read_csv(out)
    assert [r["name"] for r in rows] == ["a"]
    # shift by one column: IoU 5/7 per square -> matched at 0.5, not at 0.75
    assert (rows[0]["tp@0.5"], rows[0]["tp@0.75"], rows[0]["error_rate@0.5"]) == ("5", "0", "0.0")


def test_compare_student_with_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, teacher, student = tmp_path / "gt", tmp_path / "teacher", tmp_path / "student"
    _write_set(gt, {"x_masks.tif": _squares(6)})
    _write_set(teacher, {"x_cp_masks.tif": _squares(6)})
    student_lab = _squares(6)
    student_lab[student_lab == 6] = 0  # student misses one object the teacher found
    _write_set(student, {"x_cp_masks.tif": student_lab})
    out = tmp_path / "s.csv"
    args = ["eval", "--pred", str(student), "--gt", str(gt), "--compare", str(teacher), "--out", str(out), "--quiet"]
    assert main(args) == 0
    vs_teacher = read_csv(tmp_path / "s_vs_teacher.csv")[0]
    assert vs_teacher["n_true"] == "6" and vs_teacher["n_pred"] == "5"
    assert float(vs_teacher["binary_iou"]) == pytest.approx(5 / 6)
    assert float(vs_teacher["count_rel_error"]) == pytest.approx(1 / 6)
    assert (tmp_path / "s_vs_teacher.md").exists() and (tmp_path / "s.md").exists()
    # compare alone: the reference is the teacher, the report goes to --out itself
    out2 = tmp_path / "only.csv"
    assert main(["eval", "--pred", str(student), "--compare", str(teacher), "--out", str(out2), "--quiet"]) == 0
    assert read_csv(out2)[0]["binary_iou"] == vs_teacher["binary_iou"]
    capsys.readouterr()


def test_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--pred", str(tmp_path)]) == 2
    assert "--gt DIR" in capsys.readouterr().err
    assert main(["eval", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)]) == 2
    assert "nope: not a folder" in capsys.readouterr().err
    assert main(["eval", "--pred", str(tmp_path), "--gt", str(tmp_path), "--thresholds", "1.5"]) == 2
    empty_gt = tmp_path / "g"
    empty_gt.mkdir()
    assert main(["eval", "--pred", str(tmp_path), "--gt", str(empty_gt), "--quiet"]) == 1  # nothing to score
    assert "no image could be scored" in capsys.readouterr().out
