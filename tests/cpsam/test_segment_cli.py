"""`cpsam segment` end to end: real images in, masks/_seg.npy/overlays out, bad files skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cellpose.metrics import average_precision
from conftest import shared_image_path, shared_masks_path, shared_path

from cpsam import io
from cpsam.cli import main
from cpsam.segment_summary import read_summary

HELA = "fluo_nuclei_ctc_N2DL-HeLa"  # ../shared/data's folder of HeLa nuclei (4 images)


@pytest.fixture
def cyto0_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cyto0_file: Path) -> Path:
    """$CPSAM_CACHE holding a converted cyto_0 (the documented offline route of `pretrained`)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(cyto0_file, cache / "cyto_0_cpnet.pt")
    monkeypatch.setenv("CPSAM_CACHE", str(cache))
    return cache


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file per kind of bad input; returns name -> expected words of its message."""
    (folder / "zero_bytes.tif").write_bytes(b"")
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)  # tifffile: shape (0,)
    (folder / "not_an_image.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    np.save(folder / "four_d.npy", np.zeros((2, 3, 32, 32), np.uint16))
    nan = np.ones((64, 64), np.float32)
    nan[3, 4] = np.nan
    np.save(folder / "with_nan.npy", nan)
    inf = np.ones((64, 64), np.float32)
    inf[0, 0] = np.inf
    tifffile.imwrite(folder / "with_inf.tif", inf)
    np.save(folder / "no_pixels.npy", np.zeros((0, 64), np.uint8))
    return {
        "zero_bytes.tif": "empty (0 bytes)", "corrupt.tif": "no pixels", "not_an_image.png": "cannot be read",
        "four_d.npy": "dimensionality", "with_nan.npy": "NaN/Inf", "with_inf.tif": "NaN/Inf",
        "no_pixels.npy": "no pixels",
    }


def test_bad_files_are_reported_and_leave_nothing(tmp_path: Path, cyto0_cache: Path, capsys) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    expected = write_bad_files(inputs)
    code = main(["segment", "--model", "cyto_0", "--input", str(inputs), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    for name, words in expected.items():
        line = next(line for line in captured.err.splitlines() if f"skipped {inputs / name}:" in line)
        assert words in line, line
    assert "0 images, 0 cells" in captured.out and f"{len(expected)} failed" in captured.out
    assert [p.name for p in out.iterdir()] == ["summary.csv"]  # no partial or temporary file
    rows = read_summary(out / "summary.csv")
    assert sorted(r.file for r in rows) == sorted(expected) and {r.status for r in rows} == {"failed"}


def test_usage_errors_exit_2(tmp_path: Path, cyto0_cache: Path, capsys) -> None:
    assert main(["segment", "--model", "cyto_0", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["segment", "--model", "cyto_0", "--input", str(tmp_path / "empty"), "--output", str(tmp_path)]) == 2
    np.save(tmp_path / "x.npy", np.ones((32, 32)))
    assert main(["segment", "--model", "no_such_model", "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "neither a file nor a pretrained name" in capsys.readouterr().err


def check_outputs(out: Path, name: str, manual: np.ndarray, min_ap: float) -> float:
    masks = io.read_labels(out / f"{name}_masks.tif")
    assert masks.dtype == np.uint16 and masks.shape == manual.shape
    assert np.array_equal(np.unique(masks), np.arange(masks.max() + 1))  # consecutive labels
    seg = np.load(out / f"{name}_seg.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(seg["masks"], masks)
    assert seg["flows"][4].shape == (3, *masks.shape) and seg["outlines"].max() == masks.max()
    overlay = io.read_image(out / f"{name}_outlines.png")
    assert overlay.shape == (*masks.shape, 3) and overlay.dtype == np.uint8
    ap = float(average_precision([manual], [masks], threshold=[0.5])[0][0, 0])
    print(f"{name}: {masks.max()} masks, AP@0.5 vs manual {ap:.3f}")
    assert ap >= min_ap, (name, ap)
    return ap


def test_cli_segments_real_phase_images_and_skips_bad_ones(tmp_path: Path, cyto0_cache: Path, capsys) -> None:
    """3T3 phase contrast (cyto_0 is meaningful there): AP@0.5 >= 0.8 against the manual masks."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    name = "usiigaci_set1"
    shutil.copyfile(shared_image_path("phase_usiigaci_3t3", name), inputs / f"{name}.tif")
    (inputs / "zero_bytes.tif").write_bytes(b"")
    code = main(["segment", "--model", "cyto_0", "--input", str(inputs), "--output", str(out),
                 "--diameter", "60", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 1 and "skipped" in captured.err and "zero_bytes.tif" in captured.err
    manual = io.read_labels(shared_masks_path("phase_usiigaci_3t3", name))
    check_outputs(out, name, manual, 0.8)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{name}_masks.tif", f"{name}_outlines.png",
                                                            f"{name}_seg.npy", "summary.csv"])
    rows = {r.file: r for r in read_summary(out / "summary.csv")}
    assert rows["zero_bytes.tif"].status == "failed" and rows[f"{name}.tif"].status == "ok"
    assert rows[f"{name}.tif"].cells == int(io.read_labels(out / f"{name}_masks.tif").max())
    assert rows[f"{name}.tif"].diameter == 60.0
    assert "1 images" in captured.out and "1 failed" in captured.out


@pytest.mark.slow
def test_cli_segments_real_nuclei_folder(tmp_path: Path, cyto0_file: Path) -> None:
    """HeLa nuclei (4 images, 874 nuclei) with the classic cyto_0 file: AP@0.5 >= 0.8 on each."""
    folder = shared_path("data", HELA)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    names = sorted(p.name[: -len("_img.tif")] for p in folder.glob("*_img.tif"))
    for name in names:
        shutil.copyfile(shared_image_path(HELA, name), inputs / f"{name}.tif")
    code = main(["segment", "--model", str(cyto0_file), "--input", str(inputs), "--output", str(out),
                 "--diameter", "17"])
    assert code == 0
    for name in names:
        check_outputs(out, name, io.read_labels(shared_masks_path(HELA, name)), 0.8)
