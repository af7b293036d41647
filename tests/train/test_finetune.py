"""`cpsam finetune`: label discovery, the split, and the whole workflow on real time-lapse crops.

The seed's path end to end: a time-lapse built from the CTC HeLa frames of ../shared/data ->
`cpsam prep timelapse` (100 x 100 crops with a 2-pixel zero border, labels cut from the annotation)
-> `cpsam finetune` from a classic Cellpose file -> `cpsam segment` with the result. CP-SAM goes
through the same command (cpsam_tiny, random weights, a few steps). The learning proof (H&E and
phase contrast, kept-aside images) is `python -m benchmarks.bench_finetune`, figures in docs/results/finetune.md.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
import torch
from conftest import read_shared_image, read_shared_masks

from cpsam.cli import main as cpsam_main
from cpsam.io import write_labels, write_tiff
from cpsam.pairing import read_label_file
from train.finetune import FinetuneError, find_labelled_images, finetune, split_names


def _write_pair(folder, name, labels_as):
    image = np.random.default_rng(len(name)).integers(0, 255, (40, 50), dtype=np.uint8)
    write_tiff(folder / f"{name}.tif", image)
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 5:15], labels[20:30, 20:35] = 1, 2
    if labels_as == "masks_tif":
        write_labels(folder / f"{name}_masks.tif", labels)
    elif labels_as == "cp_masks_png":
        import cv2

        cv2.imwrite(str(folder / f"{name}_cp_masks.png"), labels)
    elif labels_as == "seg_npy":
        np.save(folder / f"{name}_seg.npy", {"masks": labels, "outlines": labels * 0, "chan_choose": [0, 0],
                                              "filename": str(folder / f"{name}.tif")}, allow_pickle=True)
    return labels


def test_labels_are_found_the_way_users_keep_them(tmp_path):
    truth = {n: _write_pair(tmp_path, n, kind) for n, kind in
             (("a", "masks_tif"), ("b", "cp_masks_png"), ("c", "seg_npy"))}
    write_tiff(tmp_path / "unlabelled.tif", np.zeros((8, 8), np.uint8))
    items, unlabelled = find_labelled_images(tmp_path)
    assert [i.name for i in items] == ["a", "b", "c"]
    assert [p.name for p in unlabelled] == ["unlabelled.tif"]
    assert {i.name: i.labels.name for i in items} == {"a": "a_masks.tif", "b": "b_cp_masks.png", "c": "c_seg.npy"}
    for item in items:
        np.testing.assert_array_equal(read_label_file(item.labels), truth[item.name])
    # a separate masks folder: NAME.* there
    masks = tmp_path / "labels"
    masks.mkdir()
    images = tmp_path / "imgs"
    images.mkdir()
    write_tiff(images / "x.tif", np.zeros((8, 8), np.uint8))
    write_labels(masks / "x.tif", np.ones((8, 8), np.uint16))
    items, _ = find_labelled_images(images, masks)
    assert [(i.name, i.labels) for i in items] == [("x", masks / "x.tif")]


def test_too_few_labelled_images_says_how_many_and_where(tmp_path, capsys):
    _write_pair(tmp_path, "only", "masks_tif")
    write_tiff(tmp_path / "other.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(FinetuneError, match=r"found 1 labelled image \(and 1 without labels\) beside the images in"):
        finetune("cyto_0", tmp_path, tmp_path / "run")
    # key=value overrides may stand before and after options (argparse alone would refuse the second)
    code = cpsam_main(["finetune", "--model", "cyto_0", "--images", str(tmp_path), "optim.lr=1e-4",
                       "--out", str(tmp_path / "r"), "schedule.epochs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "found 1 labelled image" in err and "NAME_masks" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_split_is_seeded_disjoint_and_80_20():
    names = [f"img{i:02d}" for i in range(10)]
    train, val = split_names(names, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val) and set(train) | set(val) == set(names)
    assert (train, val) == split_names(names, 0.2, seed=3)
    assert split_names(names, 0.2, seed=4) != (train, val)
    assert len(split_names(names[:2], 0.2, seed=0)[1]) == 1  # always one to validate
    with pytest.raises(FinetuneError, match="val-fraction"):
        split_names(names, 1.0, seed=0)


HELA = "fluo_nuclei_ctc_N2DL-HeLa"  # ../shared/data's CTC HeLa frames


@pytest.fixture(scope="module")
def hela_timelapse(tmp_path_factory):
    """Two real CTC HeLa time-lapses (sequences 01 and 02, two annotated frames each) cut into
    100-px crops with a 2-px border by `cpsam prep timelapse` (a canonical dataset)."""
    root = tmp_path_factory.mktemp("hela")
    stacks, masks = [], []
    for seq, frames in (("01", ("t013", "t052")), ("02", ("t075", "t079"))):
        names = [f"Fluo-N2DL-HeLa_{seq}_{t}" for t in frames]
        # CTC's HeLa frames carry a camera offset of ~33000 counts; a zero border under such an offset
        # becomes the 1st percentile and flattens the nuclei in the percentile normalization (cellpose's
        # too), so the movie is offset-corrected first, as 8-bit or background-subtracted movies are
        stack = np.stack([read_shared_image(HELA, n) for n in names]).astype(np.int32)
        stack = (stack - stack.min()).astype(np.uint16)
        labels = np.stack([read_shared_masks(HELA, n) for n in names])
        write_tiff(root / f"hela{seq}.tif", stack)
        tifffile.imwrite(root / f"hela{seq}_labels.tif", labels)  # a (T, H, W) label stack
        stacks.append(str(root / f"hela{seq}.tif"))
        masks.append(str(root / f"hela{seq}_labels.tif"))
    crops = root / "crops"
    code = cpsam_main(["prep", "timelapse", *stacks, "--masks", *masks, "--out", str(crops), "--frames", "2",
                       "--crop", "100", "--border", "2", "--seed", "5"])  # seed 5: 2-10 nuclei in each crop
    assert code == 0
    return crops


def test_finetune_a_classic_model_on_timelapse_crops_end_to_end(hela_timelapse, tmp_path, capsys, cyto0_file):
    crops = hela_timelapse
    images = sorted((crops / "images").glob("*.tif"))
    assert len(images) == 4
    first = tifffile.imread(images[0])
    assert first.shape[-2:] == (104, 104) and not first[..., :2, :].any() and not first[..., :, -2:].any()
    run = tmp_path / "run"
    weights = cyto0_file
    argv = ["finetune", "--model", str(weights), "--images", str(crops), "--out", str(run), "--channels", "0", "0",
            "--val-fraction", "0.25", "--size-epochs", "1", "schedule.epochs=2", "data.num_workers=0",
            "log.progress=false", "val.every_epochs=1"]
    assert cpsam_main(argv) == 0
    out = capsys.readouterr()
    assert "validation AP@0.5" in out.out and "Traceback" not in out.err
    train_names = (run / "train.txt").read_text().split()
    val_names = (run / "val.txt").read_text().split()
    assert len(train_names) == 3 and len(val_names) == 1 and not set(train_names) & set(val_names)
    for name in ("model.pt", "model.pt_size.npy", "metrics.csv", "curves.png", "val_report.md", "config.yaml"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "overlays").iterdir()) == [f"{val_names[0]}_after.png",
                                                                      f"{val_names[0]}_before.png"]
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert len(rows) == 1
    row = rows[0]
    assert (row["model_kind"], row["n_train"], row["n_val"], row["batch_size"], row["epochs"]) == (
        "classic", "3", "1", "8", "2")
    assert float(row["lr"]) == 0.005 and float(row["weight_decay"]) == 1e-5
    for key in ("ap50_before", "ap75_before", "ap90_before", "err50_before", "ap50_after", "ap90_after"):
        assert 0.0 <= float(row[key]) <= 1.0 or key.startswith("err")
    # cyto_0 segments HeLa nuclei crops sensibly before any training (real numbers, not a formality)
    assert float(row["ap50_before"]) > 0.3
    report = (run / "val_report.md").read_text()
    assert val_names[0] in report and "AP@0.5" in report
    # the fine-tuned model keeps the mean training diameter as its own (cellpose's rule when rescaling)
    from cpsam.models.loading import load_model

    tuned = load_model(run / "model.pt")
    assert 15.0 < float(tuned.diam_labels[0]) < 35.0 and float(tuned.diam_mean[0]) == 27.0
    # `cpsam segment` opens the result; rerunning the finished run resumes (no new training) and keeps one row
    seg_out = tmp_path / "seg"
    assert cpsam_main(["segment", "--model", str(run / "model.pt"), "--input", str(images[0]),
                       "--output", str(seg_out), "--channels", "0", "0"]) == 0
    assert (seg_out / f"{images[0].stem}_masks.tif").is_file()
    assert cpsam_main(argv) == 0
    assert len(list(csv.DictReader(open(run / "results.csv")))) == 1


def test_finetune_a_cpsam_model_with_the_same_command(hela_timelapse, tmp_path, capsys):
    from cpsam.models import create_model
    from cpsam.models.loading import save_checkpoint

    torch.manual_seed(0)
    base = tmp_path / "cpsam_tiny.pt"
    save_checkpoint(base, create_model("cpsam_tiny"))
    run = tmp_path / "run"
    argv = ["finetune", "--model", str(base), "--images", str(hela_timelapse), "--out", str(run),
            "--channels", "0", "0", "--diameter", "30", "schedule.epochs=1", "schedule.samples_per_epoch=2",
            "data.num_workers=0", "log.progress=false"]
    assert cpsam_main(argv) == 0
    capsys.readouterr()
    row = next(csv.DictReader(open(run / "results.csv")))
    assert (row["model_kind"], row["batch_size"], row["steps"]) == ("cpsam", "1", "2")
    assert float(row["lr"]) == 1e-5 and float(row["weight_decay"]) == 0.1 and row["diameter"] == "30"
    assert not (run / "model.pt_size.npy").exists()  # CP-SAM has no style vector, so no size model
    image = sorted((hela_timelapse / "images").glob("*.tif"))[0]
    assert cpsam_main(["segment", "--model", str(run / "model.pt"), "--input", str(image),
                       "--output", str(tmp_path / "seg")]) == 0
