"""`cpsam demo` (eval.study): the study's data split keeps labelled, unlabeled and held-out images apart, and the
whole study runs end to end at toy scale with a table whose numbers mean what they say."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from eval import study


def test_study_data_keeps_the_three_pools_apart(tmp_path):
    shared_path("data", "fluo_nuclei_ctc_N2DL-HeLa")
    data = study.prepare_data(tmp_path)
    labelled = {p.name[: -len("_img.tif")] for p in data.labelled.glob("*_img.tif")}
    unlabeled = {p.stem for p in data.unlabeled.glob("*.tif")}
    heldout = {p.stem for p in data.heldout.glob("*.tif")}
    assert len(labelled) == 6 and len(unlabeled) == 10 and len(heldout) == 4
    # a held-out crop comes from an image no training crop comes from; the unlabeled pool has no masks
    source = lambda name: name.rsplit("_c", 1)[0]  # noqa: E731
    assert not {source(n) for n in heldout} & {source(n) for n in labelled | unlabeled}
    # HeLa: labelled and unlabeled crops from different images (DeepCell has one training image: different crops)
    hela = lambda names: {source(n) for n in names if n.startswith("Fluo")}  # noqa: E731
    assert hela(labelled) and hela(unlabeled) and not hela(labelled) & hela(unlabeled)
    assert not list(data.unlabeled.glob("*_masks*")) and not list(data.heldout.glob("*_masks*"))
    assert len(list(data.heldout_masks.glob("*_masks.tif"))) == 4


def test_distill_overrides_compress_the_paper_schedule():
    from train.config import TrainConfig, apply_overrides

    cfg = apply_overrides(TrainConfig(), study.distill_overrides(study.StudyScale()))
    assert cfg.schedule.kind == "paper" and cfg.schedule.epochs == 16
    assert cfg.schedule.decay2_epochs <= cfg.schedule.decay1_epochs < cfg.schedule.epochs
    assert cfg.kd.alpha == pytest.approx(0.05) and cfg.kd.gt_weight == 1.0


def test_study_table_reads_the_ceiling_and_leaves_the_self_agreement_rows_out(tmp_path):
    from cpsam.report.tables import write_csv
    from distill.evaluate import MIRRORED

    def row(model, reference, iou, self_iou, ap):
        return {"model": model, "reference": reference, "dataset": "all", "binary_iou": iou, "ap@0.5": ap,
                "teacher_self_iou": self_iou, "iou_vs_ceiling": iou / self_iou if self_iou else "nan",
                "error_rate@0.5": 0.1, "n_pred": 10, "count_rel_error_total": 0.0, "seconds_per_image": 1.0}

    write_csv(tmp_path / "summary.csv", [row("teacher", "gt", 0.7, None, 0.8), row(MIRRORED, "teacher", 0.8, 0.8, 0.0),
                                         row("s1", "teacher", 0.6, 0.8, 0.0), row("s1", "gt", 0.5, None, 0.7)])
    rows = study.study_table(tmp_path / "summary.csv")
    assert [r["model"] for r in rows] == ["teacher", "s1"]
    s1 = rows[1]
    assert s1["teacher self-IoU"] == pytest.approx(0.8) and s1["IoU / ceiling"] == pytest.approx(0.75)
    assert s1["AP@0.5 (GT)"] == pytest.approx(0.7) and np.isnan(rows[0]["IoU / ceiling"])


@pytest.mark.slow
def test_study_runs_end_to_end_at_toy_scale(tmp_path):
    shared_path("data", "fluo_nuclei_ctc_N2DL-HeLa")
    scale = study.StudyScale(finetune_epochs=1, finetune_samples=8, distill_epochs=2, distill_samples=16,
                             cache_views=1)
    rows = study.run_study(tmp_path, scale)
    models = [r["model"] for r in rows]
    assert models[:2] == ["teacher cyto_0", "fine-tuned cyto_0"] and len(models) == 4
    teacher = rows[0]
    # cyto_0 on the held-out HeLa / DeepCell nuclei crops (measured 0.914 at the default scale)
    assert teacher["AP@0.5 (GT)"] > 0.85 and teacher["binarized IoU (teacher)"] == pytest.approx(1.0)
    assert all(0.0 <= float(r["binarized IoU (teacher)"]) <= 1.0 for r in rows)
    assert all(np.isfinite(float(r["s / image"])) and float(r["s / image"]) > 0 for r in rows)
    report = (tmp_path / "report.md").read_text()
    assert "| teacher cyto_0 |" in report and "figures/metrics.png" in report
    for png in ("metrics.png", f"overlay_{study.STUDENTS[0]}.png"):
        assert (tmp_path / "figures" / png).stat().st_size > 5_000
    # the students never ran the teacher: they trained from the one cache
    assert (tmp_path / "runs" / "teacher_cache" / "manifest.json").is_file()
