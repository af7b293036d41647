"""`cpsam distill export --format bioimageio`: a BioImage.IO model package that bioimageio.spec validates,
bioimageio.core's model test passes, and that segments like `cpsam segment`.

The packaged model is cyto_0 (a CPnet, the family of the seed's CPnet students; a random tiny student finds no
cells, and BioImage.IO refuses an all-zero test output), at diameter 20 on real crops.
"""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bioimageio.core import predict
from bioimageio.core import test_model as bioimageio_model_test  # not named test_*: pytest would collect it
from bioimageio.spec import load_description
from bioimageio.spec.model import v0_5
from conftest import cli, line_with, no_temp_files, no_traceback, shared_path

from cpsam import io
from cpsam.metrics import score_image
from cpsam.models import load_model
from cpsam.transforms import select_channels, to_channels_last
from distill import bioimageio_package

TEST_IMAGE = "data/bact_phase_neurips22/neurips22_cell_00528_img.tif"
CHECK_IMAGES = (  # (file, top, left, side): real crops other than the test image, different modalities
    ("data/fluo_nuclei_ctc_N2DL-HeLa/Fluo-N2DL-HeLa_02_t075_img.tif", 250, 400, 128),
    ("data/fluo_nuclei_deepcell2016", None, None, 128),
)
DIAMETER = 20.0


def _check_images(tmp: Path) -> list[Path]:
    """The CHECK_IMAGES crops written as .tif files under tmp (the inputs of `cpsam segment`)."""
    out = []
    for k, (rel, top, left, side) in enumerate(CHECK_IMAGES):
        path = shared_path(rel)
        if path.is_dir():
            path = sorted(path.glob("*_img.tif"))[0]
        image = io.read_image(path)
        hwc = to_channels_last(image) if image.ndim == 3 else image
        top = (hwc.shape[0] - side) // 2 if top is None else top
        left = (hwc.shape[1] - side) // 2 if left is None else left
        crop = np.ascontiguousarray(hwc[top : top + side, left : left + side])
        out.append(io.write_tiff(tmp / f"check{k}.tif", crop))
    return out


TEST_SIDE = 128  # the test tensors: a 128 x 128 centre crop of TEST_IMAGE (its 200 x 200 in the CLI test)


@pytest.fixture(scope="module")
def package(cyto0_file, tmp_path_factory) -> Path:
    """cyto_0 exported as a .zip package (written once for this module; the CLI is tested below)."""
    tmp = tmp_path_factory.mktemp("bioimageio")
    target = tmp / "cyto0.zip"
    path, n_cells = bioimageio_package.write_package(
        load_model(cyto0_file), target, io.read_image(shared_path(TEST_IMAGE)), source=str(cyto0_file),
        diameter=DIAMETER, test_side=TEST_SIDE)
    assert path == target and target.is_file() and n_cells >= 10
    no_temp_files(tmp)
    return target


def test_package_holds_a_valid_v0_5_description_with_its_files(package):
    descr = load_description(package)
    assert isinstance(descr, v0_5.ModelDescr), getattr(descr, "validation_summary", descr)
    assert descr.validation_summary.status == "valid-format"
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        raw = np.load(z.open("test_input.npy"))
        labels = np.load(z.open("test_output.npy"))
        weights = z.read("weights.pt")
    assert {"rdf.yaml", "weights.pt", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert rdf["license"] == "BSD-3-Clause"
    assert {c["doi"] for c in rdf["cite"]} == {"10.1038/s41592-020-01018-x", "10.1101/2025.04.28.651001"}
    assert [str(a.id) for a in descr.inputs[0].axes] == ["batch", "channel", "y", "x"]
    assert rdf["outputs"][0]["data"]["type"] == "int32"
    # the test input is the real image's crop (cyto_0: 2 channels, the grayscale image first, zeros after)
    image = io.read_image(shared_path(TEST_IMAGE)).astype(np.float32)
    assert raw.shape == (1, 2, TEST_SIDE, TEST_SIDE) and raw.dtype == np.float32
    assert np.array_equal(raw[0, 0], image[36:164, 36:164]) and not raw[0, 1].any()
    # the test output is what the packaged weights compute, and real cells
    scripted = torch.jit.load(BytesIO(weights))
    assert np.array_equal(scripted(torch.from_numpy(raw)).numpy(), labels)
    assert labels.shape == (1, 1, TEST_SIDE, TEST_SIDE) and labels.dtype == np.int32 and labels.max() >= 10


def test_bioimageio_core_model_test_passes(package):
    summary = bioimageio_model_test(package, devices=["cpu"])
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed


def test_packaged_masks_equal_cpsam_segment(package, cyto0_file, tmp_path):
    """bioimageio.core's prediction with the package against `cpsam segment --model cyto_0` on real crops."""
    images = _check_images(tmp_path)
    code, _, err = cli("segment", "--model", cyto0_file, "--input", tmp_path, "--output", tmp_path / "seg",
                       "--diameter", DIAMETER, "--device", "cpu")
    assert code == 0, err
    descr = load_description(package)
    for path in images:
        ref = io.read_labels(tmp_path / "seg" / f"{path.stem}_masks.tif")
        hwc = select_channels(to_channels_last(io.read_image(path)), None, 2)
        raw = np.ascontiguousarray(hwc.transpose(2, 0, 1)[None], dtype=np.float32)
        sample = predict(model=descr, inputs=raw)
        masks = np.asarray(sample.members["labels"].data)[0, 0]
        assert masks.shape == ref.shape and ref.max() >= 5, path.name  # real cells, not an empty agreement
        ap = score_image(ref, masks, thresholds=(0.5,)).at(0.5).ap
        assert ap >= 0.99, f"{path.name}: AP@0.5 {ap:.3f} against cpsam segment"


def test_folder_package_and_bad_requests(tmp_path, cyto0_file):
    image = shared_path(TEST_IMAGE)
    base = ("distill", "export", "--model", cyto0_file, "--format", "bioimageio")
    # no test image; a test image with the TorchScript format: one line each, nothing written
    code, _, err = cli(*base, "--out", tmp_path / "a.zip")
    assert code == 2 and line_with(err, "--test-image") and len(err.strip().splitlines()) == 1
    code, _, err = cli("distill", "export", "--model", cyto0_file, "--out", tmp_path / "b.pt", "--test-image", image)
    assert code == 2 and line_with(err, "bioimageio only")
    # a folder holding something else is refused; a missing test image is named
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = cli(*base, "--out", other, "--test-image", image)
    assert code == 2 and line_with(err, str(other), "other than a BioImage.IO package")
    code, _, err = cli(*base, "--out", tmp_path / "c.zip", "--test-image", tmp_path / "missing.tif")
    assert code == 2 and line_with(err, "missing.tif", "does not exist")
    no_traceback(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    # a folder package through the CLI: the same files, rdf.yaml pointing at them; an earlier package folder
    # may be written over (it holds rdf.yaml), any other folder not
    folder = tmp_path / "pkg"
    code, out, err = cli(*base, "--out", folder, "--test-image", image, "--diameter", DIAMETER)
    assert code == 0, err
    assert line_with(out, str(folder), "BioImage.IO model package, folder", "cells")
    assert bioimageio_package.check_package_path(folder) == folder
    assert {"rdf.yaml", "weights.pt", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= {
        p.name for p in folder.iterdir()}
    assert "Validation" in (folder / "README.md").read_text()
    (folder / "stale.txt").write_text("from the earlier package")
    code, out, err = cli(*base, "--out", folder, "--test-image", image, "--diameter", DIAMETER)  # written over
    assert code == 0, err
    assert bioimageio_package.check_package_path(folder) == folder and not (folder / "stale.txt").exists()
    no_temp_files(tmp_path)


def test_test_input_follows_segment_channel_rule():
    rgb = np.arange(40 * 50 * 3, dtype=np.uint16).reshape(40, 50, 3)
    raw = bioimageio_package.package_test_input(rgb, 2, side=32)
    assert raw.shape == (1, 2, 32, 32) and raw.dtype == np.float32
    assert np.array_equal(raw[0, 1], rgb[4:36, 9:41, 1].astype(np.float32))
    with pytest.raises(ValueError, match="at least 16"):
        bioimageio_package.package_test_input(np.zeros((8, 100)), 2)
