"""`cpsam binary` end to end on small crops of real images: the seeds' data layouts, train -> predict -> compare,
distill without masks, explore, `cpsam train lr-find`, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import shared_image_path, shared_masks_path

from cpsam.cli import main
from cpsam.io import read_image, read_labels
from data_prep.canonical import read_index
from data_prep.labels import split_components
from train.binary.data import detect_layout, prepare_binary_data

FOLDER = "fluo_nuclei_ctc_N2DL-HeLa"
FAST = ["schedule.epochs=1", "schedule.samples_per_epoch=8", "batch_size=4", "data.tile_size=64",
        "data.num_workers=0", "val.every_epochs=1", "log.progress=false", "log.tensorboard=false", "log.every_steps=1"]


def _crops(n: int, size: int = 96) -> list[tuple[str, np.ndarray, np.ndarray]]:
    image = read_image(shared_image_path(FOLDER, "Fluo-N2DL-HeLa_02_t075"))
    labels = read_labels(shared_masks_path(FOLDER, "Fluo-N2DL-HeLa_02_t075"))
    return [(f"crop{k}", image[200:200 + size, 100 + k * size:100 + (k + 1) * size],
             labels[200:200 + size, 100 + k * size:100 + (k + 1) * size]) for k in range(n)]


@pytest.fixture(scope="module")
def fullimage_root(tmp_path_factory) -> Path:
    """The first seed's layout: FullImage/NAME.tif, Mask_Norm/NAME.png (0/1 class maps), codes.txt."""
    root = tmp_path_factory.mktemp("seed1")
    (root / "FullImage").mkdir()
    (root / "Mask_Norm").mkdir()
    (root / "codes.txt").write_text("Background\nCell\n")
    for name, image, labels in _crops(4):
        tifffile.imwrite(root / "FullImage" / f"{name}.tif", image)
        cv2.imwrite(str(root / "Mask_Norm" / f"{name}.png"), (labels > 0).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def teacher_run(fullimage_root: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "teacher"
    code = main(["binary", "train", "--images", str(fullimage_root), "--out", str(run), "--model", "resnet10t_unet",
                 "--loading-code", "0,0?0.5", "--val-fraction", "0.25", *FAST])
    assert code == 0
    return run


def test_train_writes_model_history_and_plot(teacher_run: Path) -> None:
    for name in ("model.pt", "init.pt", "history.csv", "history.png", "metrics.csv", "train.txt", "val.txt"):
        assert (teacher_run / name).is_file(), name
    assert len((teacher_run / "val.txt").read_text().split()) == 1
    assert len((teacher_run / "train.txt").read_text().split()) == 3
    header = (teacher_run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "loss_ce", "jaccard", "val_iou", "val_precision", "val_recall"} <= set(header)
    saved = torch.load(teacher_run / "model.pt", map_location="cpu", weights_only=True)
    assert saved["model_name"] == "resnet10t_unet" and saved["model_kwargs"]["in_chans"] == 2
    assert saved["config"]["objective"] == "binary" and saved["config"]["binary"]["loading_code"] == "0,0?0.5"
    assert saved["config"]["augment"]["rescale_to_diam_mean"] is False
    rows = read_index(teacher_run / "data")
    assert all(r.n_objects > 1 for r in rows)  # 0/1 class maps became one instance per component


def test_predict_writes_masks_and_probabilities(teacher_run: Path, fullimage_root: Path, tmp_path: Path,
                                                capsys) -> None:
    out = tmp_path / "pred"
    assert main(["binary", "predict", "--model", str(teacher_run / "model.pt"), "--images",
                 str(fullimage_root / "FullImage"), "--out", str(out)]) == 0
    assert "4 images" in capsys.readouterr().out
    for k in range(4):
        masks = tifffile.imread(out / f"crop{k}_masks.tif")
        prob = tifffile.imread(out / f"crop{k}_prob.tif")
        assert masks.dtype == np.uint16 and prob.dtype == np.float32 and masks.shape == prob.shape == (96, 96)
        assert 0 <= prob.min() and prob.max() <= 1
        assert np.array_equal(masks, split_components(prob > 0.5))  # connected components of the probability


def test_compare_scores_runs_on_the_same_images(teacher_run: Path, tmp_path: Path) -> None:
    assert main(["binary", "compare", str(teacher_run), str(teacher_run / "init.pt"), "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert lines[0].startswith("run,model,iou,dice,precision,recall") and len(lines) == 3
    assert all(line.split(",")[6] == "1" for line in lines[1:])  # both on the one validation image
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "| IoU |" in (tmp_path / "compare.md").read_text()


def test_distill_trains_a_student_without_masks(teacher_run: Path, fullimage_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "student"
    assert main(["binary", "distill", "--teacher", str(teacher_run), "--images", str(fullimage_root / "FullImage"),
                 "--student", "resnet10t_unet", "--out", str(run), "--temperature", "2", *FAST]) == 0
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["objective"] == "binary_distill" and saved["config"]["binary"]["temperature"] == 2.0
    assert saved["config"]["binary"]["loading_code"] == "0,0?0.5"  # the teacher's
    rows = read_index(run / "data")
    assert len(rows) == 4 and {r.dataset for r in rows} == {"unlabelled"} and all(r.n_objects == 1 for r in rows)
    assert "loss_kd" in (run / "history.csv").read_text().splitlines()[0]


def test_explore_draws_the_coded_samples(fullimage_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["binary", "explore", "--images", str(fullimage_root), "--loading-code", "0|0,x", "--n", "4",
                 "--out", str(out), "data.tile_size=64"]) == 0
    grid = read_image(out)
    assert grid.shape == (2 * (64 + 18), 2 * 128, 3)


def test_lr_find_command(teacher_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lr.png"
    assert main(["train", "lr-find", str(teacher_run / "config.yaml"), "--num-it", "6", "--out", str(out),
                 "batch_size=2", "log.progress=false"]) == 0
    assert "suggested lr" in capsys.readouterr().out
    assert out.stat().st_size > 1000 and len(out.with_suffix(".csv").read_text().splitlines()) >= 3


def test_train_valid_dirs_layout_keeps_its_split(tmp_path: Path) -> None:
    """The second seed's TRAIN_IMG_DIR/0 ... VALID_LABEL_DIR/0 folders with RGB 0/255 masks."""
    root = tmp_path / "seed2"
    crops = _crops(3)
    for sub, items in (("TRAIN", crops[:2]), ("VALID", crops[2:])):
        (root / f"{sub}_IMG_DIR" / "0").mkdir(parents=True)
        (root / f"{sub}_LABEL_DIR" / "0").mkdir(parents=True)
        for name, image, labels in items:
            cv2.imwrite(str(root / f"{sub}_IMG_DIR" / "0" / f"{name}.png"), (image // 256).astype(np.uint8))
            cv2.imwrite(str(root / f"{sub}_LABEL_DIR" / "0" / f"{name}.png"),
                        np.repeat(((labels > 0) * 255).astype(np.uint8)[..., None], 3, axis=2))
    assert detect_layout(root) == "train_valid_dirs"
    data = prepare_binary_data(root, None, tmp_path / "run", progress=False)
    assert (data.n_train, data.n_val, data.layout) == (2, 1, "train_valid_dirs")
    assert (tmp_path / "run" / "val.txt").read_text().split() == ["crop2"]
    rows = {r.name: r for r in read_index(tmp_path / "run" / "data")}
    assert rows["crop2"].split == "val" and rows["crop0"].n_objects == int(split_components(crops[0][2] > 0).max())


def test_bad_input_gets_one_line(tmp_path: Path, fullimage_root: Path, capsys) -> None:
    bad = tmp_path / "model.pt"
    bad.write_text("not a model")
    out = tmp_path / "out"
    assert main(["binary", "predict", "--model", str(bad), "--images", str(fullimage_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert main(["binary", "train", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["binary", "train", "--images", str(fullimage_root), "--out", str(tmp_path / "r2"),
                 "--loading-code", "0|z"]) == 2
    assert "randomization" in capsys.readouterr().err
