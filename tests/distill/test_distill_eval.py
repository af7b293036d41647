"""`cpsam distill eval`: scores of students against the teacher (and ground truth), inputs, report, CLI."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import label_squares, save_fastnet_student, shared_image_path, shared_masks_path, write_pair

from cpsam import io
from distill.evaluate import (
    GROUND_TRUTH,
    MIRRORED,
    PLAIN,
    REPORT_FILES,
    TEACHER,
    EvalImage,
    ModelRun,
    evaluate,
    list_eval_images,
    mirror_width,
    summaries,
    write_eval_report,
)


class FixedSegmenter:
    """Stands in for a Segmenter: returns given masks per image (in call order) and records diameters."""

    def __init__(self, masks: list[np.ndarray], diameter: float = 25.0) -> None:
        self.masks = list(masks)
        self.diameter = diameter
        self.asked: list[float | None] = []
        self.augmented: list[bool] = []
        self.images: list[np.ndarray] = []
        self.rules = SimpleNamespace(mask_rules="cp3")

    def segment(self, images, diameter=None, channels=None, compute_masks=True, augment=False):
        if not compute_masks:  # the warm-up call
            return [SimpleNamespace(masks=np.zeros((0, 0), np.uint16), diameter=0.0)]
        self.asked.append(diameter)
        self.augmented.append(augment)
        self.images.append(np.asarray(images[0]))
        return [SimpleNamespace(masks=self.masks.pop(0), diameter=self.diameter if diameter is None else diameter)]


def test_scores_on_a_constructed_case(tmp_path):
    """Teacher: 4 squares of 256 px. Student: 3 of them, the 4th shifted by 8 px (IoU 128 / 384 < 0.5), plus a
    spurious 64-px square: binarized IoU (768 + 128) / (1024 + 128 + 64), 5 vs 4 objects, 3 TP."""
    teacher = label_squares()
    student = label_squares(boxes=((5, 5), (5, 35), (35, 5), (35, 43)))
    student[52:60, 20:28] = 5
    truth = label_squares()
    item = EvalImage("toy", "a", tmp_path / "a.tif", tmp_path / "a_masks.tif")
    io.write_tiff(item.image, np.zeros((60, 60), np.uint8))
    io.write_labels(item.labels, truth)
    t_run = ModelRun(TEACHER, FixedSegmenter([teacher], diameter=31.0))  # type: ignore[arg-type]
    s_run = ModelRun("student", FixedSegmenter([student]))  # type: ignore[arg-type]
    ev = evaluate([item], t_run, [s_run], progress=False)
    assert s_run.segmenter.asked == [31.0]  # the student ran at the diameter the teacher used
    row = next(r for r in ev.rows if r["model"] == "student" and r["reference"] == TEACHER)
    assert row["n_true"] == 4 and row["n_pred"] == 5
    assert row["binary_iou"] == pytest.approx((768 + 128) / (1024 + 128 + 64))
    assert row["count_rel_error"] == pytest.approx(0.25)
    assert row["tp@0.5"] == 3 and row["fp@0.5"] == 2 and row["fn@0.5"] == 1
    assert row["ap@0.5"] == pytest.approx(3 / 6) and row["error_rate@0.5"] == pytest.approx(3 / 4)
    gt_teacher = next(r for r in ev.rows if r["model"] == TEACHER and r["reference"] == GROUND_TRUTH)
    assert gt_teacher["ap@0.5"] == 1.0 and gt_teacher["binary_iou"] == 1.0
    summary = {(r["model"], r["reference"], r["dataset"]): r for r in summaries(ev)}
    assert summary[("student", TEACHER, "all")]["count_rel_error_total"] == pytest.approx(0.25)
    assert summary[("student", GROUND_TRUTH, "toy")]["n_images"] == 1
    paths = write_eval_report(tmp_path / "report", ev, "teacher.pt", ["student.pt"])
    assert [p.name for p in paths] == list(REPORT_FILES) and all(p.stat().st_size > 0 for p in paths)
    with open(paths[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and {r["reference"] for r in rows} == {TEACHER, GROUND_TRUTH}
    text = paths[2].read_text()
    assert "| student | all | 1 | 4 | 5 | 0.7368 | nan | nan | 0.2500 |" in text  # no ceiling without the mirror


def test_mirror_width_finds_the_width_axis():
    hw = np.arange(12).reshape(3, 4)
    assert (mirror_width(hw, (3, 4)) == hw[:, ::-1]).all()
    hwc = np.stack([hw, hw + 100], axis=-1)
    assert (mirror_width(hwc, (3, 4))[..., 1] == (hw + 100)[:, ::-1]).all()
    chw = np.stack([hw, hw + 100])
    assert (mirror_width(chw, (3, 4))[1] == (hw + 100)[:, ::-1]).all()
    with pytest.raises(ValueError, match="width axis"):
        mirror_width(hw, (4, 3))


def test_the_teachers_agreement_with_its_mirror_image(tmp_path):
    """The teacher segments the image, then its mirror image (at the same diameter); its masks there, mirrored
    back, are scored against its own like a student's. Here the mirrored run loses the object at (5, 5) and
    shifts nothing else: binarized IoU 768 / 1024, 3 of 4 objects; never scored against ground truth."""
    teacher = label_squares()
    on_mirror = np.ascontiguousarray(label_squares(boxes=((5, 35), (35, 5), (35, 35)))[:, ::-1])
    item = EvalImage("toy", "a", tmp_path / "a.tif", tmp_path / "a_masks.tif")
    image = np.arange(60 * 60, dtype=np.uint16).reshape(60, 60)
    io.write_tiff(item.image, image)
    io.write_labels(item.labels, teacher)
    t_run = ModelRun(TEACHER, FixedSegmenter([teacher, on_mirror], diameter=31.0))  # type: ignore[arg-type]
    s_run = ModelRun("student", FixedSegmenter([teacher]))  # type: ignore[arg-type]
    ev = evaluate([item], t_run, [s_run], progress=False, mirror=True)
    assert t_run.segmenter.asked == [None, 31.0]  # the mirror image at the diameter the teacher chose
    assert (t_run.segmenter.images[1] == image[:, ::-1]).all()
    row = next(r for r in ev.rows if r["model"] == MIRRORED)
    assert row["reference"] == TEACHER and row["n_true"] == 4 and row["n_pred"] == 3
    assert row["binary_iou"] == pytest.approx(768 / 1024) and row["tp@0.5"] == 3
    assert not any(r["model"] == MIRRORED and r["reference"] == GROUND_TRUTH for r in ev.rows)
    assert len(t_run.seconds) == 1 and len(ev.seconds[MIRRORED]) == 1  # the teacher's own time is not mixed in
    text = write_eval_report(tmp_path / "report", ev, "teacher.pt", ["student.pt"])[2].read_text()
    assert f"| {MIRRORED} | all | 1 | 4 | 3 | 0.7500 | 0.7500 | 1.0000 |" in text
    # the ceiling: a student equal to the teacher is 1 / 0.75 of the teacher's agreement with its mirror image
    summary = {(r["model"], r["reference"], r["dataset"]): r for r in summaries(ev)}
    for dataset in ("toy", "all"):
        row = summary[("student", TEACHER, dataset)]
        assert row["teacher_self_iou"] == pytest.approx(0.75) and row["iou_vs_ceiling"] == pytest.approx(1 / 0.75)
    assert np.isnan(summary[("student", GROUND_TRUTH, "all")]["iou_vs_ceiling"])
    assert "| student | all | 1 | 4 | 4 | 1.0000 | 0.7500 | 1.3333 |" in text


def test_an_augmented_teachers_ceiling_is_its_agreement_with_itself_unaugmented(tmp_path):
    """--teacher-augment: the teacher segments with augment=True (and so does its mirrored run); the same teacher
    without it (teacher-plain, at the teacher's diameter) is scored against it and becomes the ceiling. Here the
    plain run loses one of 4 squares (IoU 0.75) and the mirrored one none; a student that loses two is at 0.5,
    2/3 of the ceiling."""
    teacher, lost_one = label_squares(), label_squares(boxes=((5, 5), (5, 35), (35, 5)))
    mirrored = np.ascontiguousarray(teacher[:, ::-1])
    item = EvalImage("toy", "a", tmp_path / "a.tif")
    io.write_tiff(item.image, np.zeros((60, 60), np.uint8))
    t_run = ModelRun(TEACHER, FixedSegmenter([teacher, mirrored, lost_one], diameter=31.0))  # type: ignore[arg-type]
    s_run = ModelRun("student", FixedSegmenter([label_squares(boxes=((5, 5), (5, 35)))]))  # type: ignore[arg-type]
    ev = evaluate([item], t_run, [s_run], progress=False, mirror=True, teacher_augment=True)
    assert t_run.segmenter.augmented == [True, True, False] and s_run.segmenter.augmented == [False]
    assert t_run.segmenter.asked == [None, 31.0, 31.0]
    summary = {(r["model"], r["reference"], r["dataset"]): r for r in summaries(ev)}
    assert summary[(MIRRORED, TEACHER, "all")]["binary_iou"] == 1.0
    assert summary[(PLAIN, TEACHER, "all")]["binary_iou"] == pytest.approx(0.75)
    row = summary[("student", TEACHER, "all")]
    assert row["teacher_self_iou"] == pytest.approx(0.75) and row["iou_vs_ceiling"] == pytest.approx(0.5 / 0.75)
    assert set(ev.seconds) == {TEACHER, "student", MIRRORED, PLAIN}


def test_count_error_total_differs_from_the_per_image_mean(tmp_path):
    """Two images: +2 of 4 and -2 of 4 objects: per-image mean error 0.5, error of the summed counts 0.
    A third, unreadable image is recorded as a problem and passed over."""
    extra = ((5, 5), (5, 35), (35, 5), (35, 35), (0, 22), (22, 22))
    students = [label_squares(boxes=extra, side=8), label_squares(boxes=((5, 5), (5, 35)))]
    items = [EvalImage("toy", n, tmp_path / f"{n}.tif") for n in "abc"]
    for item in items[:2]:
        io.write_tiff(item.image, np.zeros((60, 60), np.uint8))
    items[2].image.write_text("not an image")
    ev_t = ModelRun(TEACHER, FixedSegmenter([label_squares(), label_squares()]))  # type: ignore[arg-type]
    ev_s = ModelRun("s", FixedSegmenter(students))  # type: ignore[arg-type]
    ev = evaluate(items, ev_t, [ev_s], progress=False)
    assert len(ev.problems) == 1 and "c.tif" in ev.problems[0]
    assert [r["n_pred"] for r in ev.rows] == [6, 2]
    total = next(r for r in summaries(ev) if r["dataset"] == "all")
    assert total["count_rel_error"] == pytest.approx(0.5) and total["count_rel_error_total"] == 0.0
    assert total["n_true"] == 8 and total["n_pred"] == 8


def test_list_eval_images_pairs_unlabelled_and_canonical(tmp_path):
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    write_pair(tmp_path / "set" / "f1", "x", image, label_squares((64, 64)))
    write_pair(tmp_path / "set" / "f1", "y", image, None)
    write_pair(tmp_path / "set" / "f2", "z", image, label_squares((64, 64)))
    (tmp_path / "set" / "_qc").mkdir()
    items = list_eval_images([tmp_path / "set"], gt="auto")
    assert [(i.dataset, i.name, i.labels is not None) for i in items] == [
        ("f1", "x", True), ("f1", "y", False), ("f2", "z", True)]
    assert all(i.labels is None for i in list_eval_images([tmp_path / "set"], gt=None))
    gt_dir = tmp_path / "gt"
    io.write_labels(gt_dir / "y_masks.tif", label_squares((64, 64)))
    assert [i.labels is not None for i in list_eval_images([tmp_path / "set" / "f1"], gt=str(gt_dir))] == [False, True]

    from data_prep.canonical import write_example, write_index

    root = tmp_path / "canon"
    write_index(root, [write_example(root, name, image, label_squares((64, 64)), dataset="c", split=split,
                                     license="test", source="constructed")
                       for name, split in (("p", "train"), ("q", "val"))])
    val = list_eval_images([root], gt="auto", split="val")
    assert [(i.name, i.labels is not None) for i in val] == [("q", True)]
    # --gt DIR replaces a canonical dataset's own labels (e.g. a teacher's) by DIR's manual ones
    manual = tmp_path / "manual"
    io.write_labels(manual / "canon" / "q_masks.tif", label_squares((64, 64)))
    val = list_eval_images([root], gt=str(manual), split="val")
    assert [i.labels for i in val] == [manual / "canon" / "q_masks.tif"]
    assert [i.labels for i in list_eval_images([root], gt=str(manual))] == [None, manual / "canon" / "q_masks.tif"]
    from distill.evaluate import EvalError

    with pytest.raises(EvalError, match="no such folder"):
        list_eval_images([tmp_path / "missing"], gt=None)


def test_cli_end_to_end_with_cyto0_and_a_student(tmp_path, capsys, cyto0_file):
    from cpsam.cli import main

    images = tmp_path / "images"
    image = io.read_image(shared_image_path("bact_phase_neurips22", "neurips22_cell_00528"))
    labels = io.read_labels(shared_masks_path("bact_phase_neurips22", "neurips22_cell_00528"))
    write_pair(images, "bact", image[:128, :128], labels[:128, :128])
    ckpt = save_fastnet_student(tmp_path / "runA" / "model.pt")
    out = tmp_path / "report"
    code = main(["distill", "eval", "--teacher", str(cyto0_file), "--student", str(ckpt), "--student", str(cyto0_file),
                 "--images", str(images), "--gt", "--out", str(out), "--diameter", "20", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    with open(out / "summary.csv", newline="") as fh:
        summary = {(r["model"], r["reference"], r["dataset"]): r for r in csv.DictReader(fh)}
    # the teacher scored as a student agrees with itself exactly; runA is a random network
    same = summary[("cyto_0_cpnet_torch", TEACHER, "all")]
    assert float(same["binary_iou"]) == 1.0 and float(same["ap@0.5"]) == 1.0 and float(same["n_true"]) >= 5
    assert ("runA", TEACHER, "images") in summary and ("teacher", GROUND_TRUTH, "all") in summary
    # on by default: cyto_0 against itself on the mirrored crop (high but, on real cells, not exactly 1)
    assert 0.7 < float(summary[(MIRRORED, TEACHER, "all")]["binary_iou"]) <= 1.0
    assert (MIRRORED, GROUND_TRUTH, "all") not in summary
    ceiling = float(summary[(MIRRORED, TEACHER, "all")]["binary_iou"])
    assert float(same["teacher_self_iou"]) == pytest.approx(ceiling)
    assert float(same["iou_vs_ceiling"]) == pytest.approx(1.0 / ceiling)
    assert float(summary[("teacher", GROUND_TRUTH, "all")]["ap@0.5"]) > 0.0
    printed = capsys.readouterr().out
    assert "runA" in printed and "binarized IoU" in printed

    code = main(["distill", "eval", "--teacher", str(cyto0_file), "--student", str(tmp_path / "nope.pt"),
                 "--images", str(images), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.pt" in err[0] and "cannot load --student" in err[0]
    assert not (tmp_path / "r2" / "report.md").exists()
