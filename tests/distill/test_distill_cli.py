"""`cpsam distill` end to end on real images WITHOUT masks: the teacher (cyto_0) labels them per source folder,
a tiny student trains a few steps through the loop, RUN/model.pt opens in `cpsam segment`; plus the CLI's
one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_cpnet, shared_image_path, write_shared_canonical

from cpsam.cli import main as cpsam_main
from distill.calibrate import CALIBRATION_FILE, FLOW_THRESHOLD_GRID

IMAGES = {"baby": [("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA"),
                   ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testB")],
          "bact": [("bact_phase_neurips22", "neurips22_cell_00528")]}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two source folders of real images (links to ../shared/data), their masks left behind."""
    root = tmp_path_factory.mktemp("unlabelled") / "images"
    for folder, items in IMAGES.items():
        (root / folder).mkdir(parents=True)
        for source, name in items:
            os.symlink(shared_image_path(source, name), root / folder / f"{name}_img.tif")
    (root / "_qc").mkdir()  # quick-look folders are passed over
    return root


def test_distill_a_folder_without_masks_end_to_end(images, tmp_path, capsys, cyto0_file):
    from cpsam.models.loading import load_model, read_checkpoint
    from data_prep.canonical import CanonicalDataset

    teacher = cyto0_file
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--images", str(images), "--student", "cpnet-1-32", "--out",
            str(run), "--channels", "0", "0", "--size-epochs", "1", "--quiet", "schedule.epochs=1",
            "schedule.samples_per_epoch=4", "batch_size=2", "data.num_workers=0", "val.every_epochs=1",
            "log.tensorboard=false"]
    assert cpsam_main(argv) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "best validation AP@0.5 against the teacher's masks" in out.out
    # the teacher's masks are the labels, split per source folder: every folder of two has a held-out image
    baby, bact = CanonicalDataset(run / "data" / "baby"), CanonicalDataset(run / "data" / "bact")
    assert sorted(r.split for r in baby) == ["train", "val"] and [r.split for r in bact] == ["train"]
    assert all(r.n_objects > 0 for r in (*baby, *bact)) and not (run / "data" / "_qc").exists()
    metrics = (run / "metrics.csv").read_text()
    assert "kd_feature" in metrics and "val_kd_loss" in metrics and "val_ap50/baby" in metrics
    # an ordinary checkpoint: the student at the teacher's diameter, with the teacher and its rules recorded
    ckpt = read_checkpoint(run / "model.pt")
    student = load_model(run / "model.pt")
    assert student.nbase == [1, 32] and float(student.diam_mean) == pytest.approx(27.0)
    assert ckpt["config"]["kd"]["teacher"] == [str(teacher)] and ckpt["config"]["kd"]["channels"] == [0, 0]
    assert ckpt["config"]["val"]["flow_threshold"] == pytest.approx(0.4)
    # what cpsam segment applies by default: the teacher's mask rules and channels
    assert ckpt["inference"]["mask_rules"] == "cp3" and ckpt["inference"]["channels"] == [0, 0]
    assert student.inference_record["channels"] == [0, 0]
    # the student's own flow threshold, chosen on its training images against the teacher's masks
    calibrated = ckpt["inference"]["mask_thresholds"]["flow_threshold"]
    assert calibrated in FLOW_THRESHOLD_GRID and (run / CALIBRATION_FILE).is_file()
    assert f"flow threshold {calibrated:g} (mean AP@0.5 against the teacher's masks" in out.err
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert state["objective"] == "distill" and state["step"] == 2
    assert (run / "model.pt_size.npy").is_file()
    seg_out = tmp_path / "seg"
    assert cpsam_main(["segment", "--model", str(run), "--input", str(images / "bact"), "--output", str(seg_out),
                       "--diameter", "10"]) == 0
    assert (seg_out / "neurips22_cell_00528_img_masks.tif").is_file()
    # a rerun of the same command reuses the teacher's labels and the finished run (nothing is recomputed)
    mask = run / "data" / "baby" / "masks" / "baby_mmsCMOS_testA.tif"
    before = mask.stat().st_mtime_ns
    again = list(argv)
    again[again.index("--size-epochs") + 1] = "0"
    assert cpsam_main(again) == 0
    assert mask.stat().st_mtime_ns == before
    assert "resuming" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    ([], "give --out RUN"),
    (["--student", "nonet", "--out", "RUN"], "--student 'nonet' is not a registered model"),
    (["--student", "cpnet-1-32", "--out", "RUN", "kd.loss=l1"], "kd.loss must be one of"),
    (["--student", "cpnet-1-32", "--out", "RUN", "--teacher", "no_such_model"], "teacher no_such_model"),
    (["--student", "cpnet-1-32", "--out", "RUN", "kd.cache=/nonexistent"], "no cache manifest"),
])
def test_bad_requests_get_one_line(images, tmp_path, capsys, extra, message, cyto0_file):
    weights = str(cyto0_file)
    argv = ["distill", "--images", str(images), *extra]
    argv = [a.replace("RUN", str(tmp_path / "r")) for a in argv]
    if "--teacher" not in argv:
        argv += ["--teacher", weights]
    assert cpsam_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_without_student_the_default_student_trains_with_its_recipe_under_given_keys(tmp_path, capsys):
    """No --student: DEFAULT_STUDENT with DEFAULT_RECIPE, where the command's own key=value pairs win."""
    from cpsam.models.loading import load_model
    from distill.workflow import DEFAULT_RECIPE, DEFAULT_STUDENT, with_default_recipe
    from train.config import load_config

    assert with_default_recipe(["kd.alpha=1"]) == [*(o for o in DEFAULT_RECIPE if not o.startswith("kd.alpha=")),
                                                   "kd.alpha=1"]
    dataset = write_shared_canonical(tmp_path / "canon" / "real", [("bact_phase_neurips22", "neurips22_cell_00528",
                                                                    "train")])
    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--images", str(dataset), "--out", str(run), "--size-epochs", "0",
            "--quiet", "schedule.epochs=1", "schedule.decay1_epochs=0", "schedule.decay2_epochs=0",
            "schedule.warmup_epochs=0", "schedule.samples_per_epoch=2", "batch_size=2", "data.num_workers=0",
            "data.tile_size=64", "log.tensorboard=false"]
    assert cpsam_main(argv) == 0
    assert f"student {DEFAULT_STUDENT} (the default)" in capsys.readouterr().out
    cfg = load_config(run / "config.yaml")
    assert cfg.model.name == DEFAULT_STUDENT
    assert cfg.kd.alpha == pytest.approx(0.05) and cfg.kd.gt_weight == 0.0 and cfg.schedule.kind == "paper"
    assert cfg.schedule.epochs == 1 and cfg.schedule.samples_per_epoch == 2  # the command's keys win
    assert type(load_model(run / "model.pt")).__name__ == "FastNet"
