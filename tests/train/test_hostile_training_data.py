"""Hostile training data for `cpsam finetune` and `cpsam binary train|distill` (issue 33, items 5, 6, 10, 12):
unusable labels and absurd options end in one line with the right exit code (usage 2, data 1), bad images are
left out BEFORE the split (never an empty validation set scored as NaN), a refused run changes nothing in the
folder it was pointed at, and what pairing skipped is counted.

Commands run in this process through `cpsam.cli.main` with a tiny random CPnet ([2, 8, 16]) and 96-px crops of a
real HeLa frame of ../shared/data; the few runs that train take a handful of steps.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DIR, can_mount, cli, line_with
from conftest import no_traceback as conftest_no_traceback

from cpsam import io
from cpsam.models import create_model, save_checkpoint
from data_prep.canonical import read_index, write_example

FOLDER = SHARED_DIR / "data" / "fluo_nuclei_ctc_N2DL-HeLa"
FAST = ["schedule.epochs=1", "schedule.samples_per_epoch=2", "batch_size=2", "data.tile_size=64",
        "data.num_workers=0", "val.every_epochs=1", "log.progress=false", "log.tensorboard=false"]


# --------------------------------------------------------------------------- helpers



def no_traceback(*texts: str) -> None:
    """No traceback and no 'unexpected error' line (the command layer's text for an unhandled exception)."""
    conftest_no_traceback(*texts, markers=("Traceback (most recent call last)", "unexpected error"))


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha1} of every file under `root` (what a refused run must leave as it was)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _crops(n: int, size: int = 96) -> list[tuple[np.ndarray, np.ndarray]]:
    if not FOLDER.is_dir():
        pytest.skip(f"{FOLDER} is absent: these tests need the project's shared data")
    image = io.read_image(FOLDER / "Fluo-N2DL-HeLa_02_t075_img.tif")
    labels = io.read_labels(FOLDER / "Fluo-N2DL-HeLa_02_t075_masks.tif")
    return [(image[200:200 + size, 100 + k * size:100 + (k + 1) * size],
             labels[200:200 + size, 100 + k * size:100 + (k + 1) * size]) for k in range(n)]


def labelled_folder(folder: Path, n: int = 4, bad: dict[str, str] | None = None) -> Path:
    """FOLDER/cropK.tif + cropK_masks.tif; `bad` = {name: "background" | "tiny"}: that pair's masks all zero, or a
    1 x 1 image and mask."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image, labels) in enumerate(_crops(n)):
        name = f"crop{k}"
        kind = (bad or {}).get(name)
        if kind == "background":
            labels = np.zeros_like(labels)
        elif kind == "tiny":
            image, labels = image[:1, :1], np.ones((1, 1), np.uint16)
        io.write_tiff(folder / f"{name}.tif", image)
        io.write_labels(folder / f"{name}_masks.tif", labels)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random classic CPnet checkpoint."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", create_model("cpnet", nbase=[2, 8, 16]))


def finetune(model: Path, images: Path, out: Path, *extra: str | Path) -> tuple[int, str, str]:
    return cli("finetune", "--model", model, "--images", images, "--out", out, "--size-epochs", "1", *FAST, *extra)


# --------------------------------------------------------------------------- item 5: one line, the right code


@pytest.mark.parametrize("kind", ["background", "tiny"])
def test_finetune_on_unusable_labels_is_one_data_error(kind, model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 3, {f"crop{k}": kind for k in range(3)})
    code, out, err = finetune(model, images, tmp_path / "run")
    no_traceback(out, err)
    assert code == 1, err
    line = line_with(err, "cpsam finetune:", "no usable labelled image")
    assert "left out" in err and str(images / "crop0.tif") in err, err
    assert line


@pytest.mark.parametrize("diameter", ["1e9", "1e5", "0.01", "-3", "nan"])
def test_finetune_absurd_diameter_is_a_usage_error_before_anything_is_written(diameter, model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    code, out, err = finetune(model, images, tmp_path / "run", "--diameter", diameter)
    no_traceback(out, err)
    assert code == 2, err
    assert "--diameter" in err
    assert not (tmp_path / "run").exists()


def test_finetune_diameter_too_large_for_the_images_is_refused_naming_it(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)  # 96-px crops: diameter 5000 leaves no pixel (30 / 5000 x 96)
    code, out, err = finetune(model, images, tmp_path / "run", "--diameter", "5000")
    no_traceback(out, err)
    assert code == 2 and "--diameter 5000" in line_with(err, "cpsam finetune:", "leaves no pixels"), err


def test_finetune_out_on_a_read_only_folder_is_one_line(model, tmp_path, readonly_dir):
    images = labelled_folder(tmp_path / "imgs", 2)
    code, out, err = finetune(model, images, readonly_dir / "run")
    no_traceback(out, err)
    assert code == 2, err
    assert str(readonly_dir / "run") in line_with(err, "cpsam finetune:", "--out")


def test_finetune_on_a_nearly_full_disk_is_one_line(model, tmp_path):
    if not can_mount():
        pytest.skip("needs a tmpfs mount (root) for a real full disk")
    images = labelled_folder(tmp_path / "imgs", 3)
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:  # the data and the config fit, the training checkpoint (weights + optimizer state) does not
        code, out, err = finetune(model, images, disk / "run")
        leftovers = [p for p in disk.rglob("*") if ".part" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    no_traceback(out, err)
    assert code == 1, err
    assert "No space left on device" in err and "RuntimeError" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cpsam finetune:") and str(disk / "run") in last, err
    assert not leftovers


def test_binary_distill_from_a_flow_teacher_is_a_usage_error_naming_teacher(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    code, out, err = cli("binary", "distill", "--teacher", model, "--images", images, "--out", tmp_path / "run",
                         *FAST)
    no_traceback(out, err)
    assert code == 2, err
    assert str(model) in line_with(err, "cpsam binary distill:", "--teacher", "binary")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- item 6: bad images before the split


def test_finetune_leaves_bad_images_out_before_the_split(model, tmp_path):
    # seed 0 holds out one of four: whichever it would have been, the bad ones never reach the split
    images = labelled_folder(tmp_path / "imgs", 4, {"crop1": "background", "crop2": "tiny"})
    run = tmp_path / "run"
    code, out, err = finetune(model, images, run, "--val-fraction", "0.5", "--seed", "0")
    no_traceback(out, err)
    assert code == 0, err
    train_txt = (run / "train.txt").read_text().split()
    val_txt = (run / "val.txt").read_text().split()
    assert len(train_txt) == 1 and len(val_txt) == 1 and set(train_txt + val_txt) == {"crop0", "crop3"}
    assert {r.name: r.split for r in read_index(run / "data")} == {train_txt[0]: "train", val_txt[0]: "val"}
    assert "1 train / 1 val" in out and "nan" not in out.lower(), out


def test_finetune_with_one_usable_image_refuses_instead_of_scoring_nothing(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 3, {"crop1": "background", "crop2": "tiny"})
    code, out, err = finetune(model, images, tmp_path / "run")
    no_traceback(out, err)
    assert code == 1, err
    assert "need at least 2" in line_with(err, "cpsam finetune:", "only 1 usable")


def test_binary_train_leaves_bad_images_out_before_the_split(tmp_path):
    images = labelled_folder(tmp_path / "imgs", 4, {"crop1": "background", "crop2": "tiny"})
    run = tmp_path / "run"
    code, out, err = cli("binary", "train", "--images", images, "--out", run, "--model", "resnet10t_unet",
                         "--val-fraction", "0.5", *FAST)
    no_traceback(out, err)
    assert code == 0, err
    train_txt = (run / "train.txt").read_text().split()
    val_txt = (run / "val.txt").read_text().split()
    assert len(train_txt) == 1 and len(val_txt) == 1 and set(train_txt + val_txt) == {"crop0", "crop3"}
    assert "1 training and 1 validation" in err


# --------------------------------------------------------------------------- item 10: refuse before writing


def _other_run(folder: Path) -> dict[str, str]:
    """A folder as another run leaves it (config.yaml, data/index.csv, train.txt, val.txt, a model file)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("objective: flow\n")
    (folder / "train.txt").write_text("a\n")
    (folder / "val.txt").write_text("b\n")
    (folder / "model.pt").write_bytes(b"weights")
    image, labels = _crops(1)[0]
    for name, split in (("a", "train"), ("b", "val")):
        write_example(folder / "data", name, image, labels, dataset="other", split=split, license="x", source="x")
    from data_prep.canonical import write_index

    write_index(folder / "data", read_index(folder / "data"))
    return tree(folder)


@pytest.mark.parametrize("command", ["finetune", "binary train", "binary distill"])
def test_a_refused_run_changes_nothing_in_another_runs_folder(command, model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 3)
    other = tmp_path / "other"
    before = _other_run(other)
    if command == "finetune":
        code, out, err = finetune(model, images, other)
    elif command == "binary train":
        code, out, err = cli("binary", "train", "--images", images, "--out", other, "--model", "resnet10t_unet",
                             *FAST)
    else:
        teacher = tmp_path / "teacher.pt"
        torch.manual_seed(0)
        save_checkpoint(teacher, create_model("resnet10t_unet", in_chans=1, num_classes=2))
        code, out, err = cli("binary", "distill", "--teacher", teacher, "--images", images, "--out", other, *FAST)
    no_traceback(out, err)
    assert code == 2, err
    assert str(other) in line_with(err, f"cpsam {command}:", "--out", "another run")
    assert tree(other) == before


def test_a_finetune_folder_of_another_request_is_refused_untouched(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 3)
    run = tmp_path / "run"
    code, _, err = finetune(model, images, run)
    assert code == 0, err
    before = tree(run)
    others = labelled_folder(tmp_path / "other_imgs", 2)
    code, out, err = finetune(model, others, run)
    no_traceback(out, err)
    assert code == 2 and "images" in line_with(err, "cpsam finetune:", "--out", "another request"), err
    assert tree(run) == before


def test_distill_into_another_runs_folder_is_refused_untouched(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 3)
    other = tmp_path / "other"
    before = _other_run(other)
    code, out, err = cli("distill", "--teacher", model, "--images", images, "--student", "cpnet-1-32-64",
                         "--out", other, *FAST)
    no_traceback(out, err)
    assert code == 2, err
    assert str(other) in line_with(err, "cpsam distill:", "--out", "another run")
    assert tree(other) == before


# --------------------------------------------------------------------------- item 12: counted, and the right words


def test_finetune_counts_unlabelled_images_and_orphan_masks(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    io.write_tiff(images / "lonely1.tif", np.zeros((8, 8), np.uint8))
    io.write_tiff(images / "lonely2.tif", np.zeros((8, 8), np.uint8))
    io.write_labels(images / "ghost_masks.tif", np.ones((8, 8), np.uint16))
    code, out, err = finetune(tmp_path / "missing.pt", images, tmp_path / "run")  # stops after the pairing
    assert code == 2 and "cannot load the model" in err
    line = line_with(err, "cpsam finetune: skipped")
    assert "2 images without labels" in line and "1 label file of no image" in line and "ghost_masks.tif" in line


def test_binary_train_counts_unlabelled_images_and_orphan_masks(tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    io.write_tiff(images / "lonely1.tif", np.zeros((8, 8), np.uint8))
    io.write_labels(images / "ghost_masks.tif", np.ones((8, 8), np.uint16))
    code, out, err = cli("binary", "train", "--images", images, "--out", tmp_path / "run", "--model",
                         "resnet10t_unet", *FAST)
    no_traceback(out, err)
    assert code == 0, err
    line = line_with(err, "cpsam binary: skipped")
    assert "1 image without labels" in line and "lonely1.tif" in line, line
    assert "1 label file of no image" in line and "ghost_masks.tif" in line, line


@pytest.mark.parametrize("command", ["binary train", "binary distill"])
@pytest.mark.parametrize("override", ["max_steps=0", "no_such_key=1"])
def test_binary_bad_overrides_are_refused_before_anything_is_written(model, command, override, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    run = tmp_path / "run"
    if command == "binary train":
        code, out, err = cli("binary", "train", "--images", images, "--out", run, "--model", "resnet10t_unet",
                             override, *FAST)
    else:
        teacher = tmp_path / "teacher.pt"
        save_checkpoint(teacher, create_model("resnet10t_unet", in_chans=1, num_classes=2))
        code, out, err = cli("binary", "distill", "--teacher", teacher, "--images", images, "--out", run,
                             "--student", "resnet10t_unet", override, *FAST)
    no_traceback(out, err)
    assert code == 2, err
    assert override.split("=")[0] in line_with(err, "cpsam binary", "override"), err
    assert not run.exists()


def test_binary_train_with_too_few_labelled_images_makes_no_run_folder(tmp_path):
    images = labelled_folder(tmp_path / "imgs", 1)
    code, out, err = cli("binary", "train", "--images", images, "--out", tmp_path / "run", *FAST)
    no_traceback(out, err)
    assert code == 2 and "need at least 2" in line_with(err, "cpsam binary train:", "found 1 labelled image"), err
    assert not (tmp_path / "run").exists()


def test_finetune_says_when_channels_cannot_apply_to_single_channel_images(model, tmp_path):
    images = labelled_folder(tmp_path / "imgs", 2)
    code, out, err = finetune(model, images, tmp_path / "run", "--channels", "5", "0", "max_steps=1")
    no_traceback(out, err)
    assert code == 0, err
    line = line_with(err, "cpsam finetune:", "--channels 5 0 ignored")
    assert "2 single-channel images" in line and "crop0" in line, line


def test_a_1xn_mask_is_too_small_not_other_than_2d(tmp_path):
    from train.data import check_example

    root = tmp_path / "ds"
    row = write_example(root, "strip", np.ones((1, 40), np.uint8), np.ones((1, 40), np.uint16), dataset="d",
                        split="train", license="x", source="x")
    reason = check_example(root, row)
    assert reason is not None and "2-D" not in reason and "too small" in reason and "1 x 40" in reason, reason
