"""Hostile inputs for the training-side commands (issue 33, items 2, 3, 4, 11 and the preview suffix of 12): absurd
sizes refused up front by the one size guard (`cpsam.cli_types.size_problem`), a full disk under
`cpsam distill export`, non-finite and unreadable images under `cpsam binary predict`, nonsense options and a NaN
frame under `cpsam prep timelapse`. Each case checks the exit code, one line naming the option or file, no
traceback and no stray file. Helpers (cli, line_with, tmpfs, ...) come from tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import can_mount, cli, line_with, no_temp_files, no_traceback, tmpfs

from cpsam import io
from cpsam.models import create_model, save_checkpoint
from data_prep.canonical import read_index

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(33)


def usage_line(err: str, option: str) -> str:
    """The one error line naming `option` (argparse's "argument --x: ..." or the command's "cpsam ...: --x ..."),
    not the usage synopsis that lists it too."""
    hits = [line for line in err.splitlines() if f"argument {option}:" in line or f": {option} " in line]
    assert len(hits) == 1, (option, err)
    return hits[0]


def _config(tmp_path: Path) -> Path:
    """A minimal training config (its data folder need not exist: the size checks come first)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: cpnet, nbase: [2, 8, 16]}}\ndata: {{train: [{tmp_path / 'data'}]}}\n")
    return cfg


# --------------------------------------------------------------------------- item 3 / 12: sizes, preview --out


@pytest.mark.parametrize(("argv", "limit"), [
    (["--n", "100000000"], "1024"),
    (["--n", "0"], "1024"),
    (["--out", "grid.txt"], ".png"),
])
def test_preview_absurd_n_or_non_png_out_is_a_usage_error(tmp_path: Path, argv: list[str], limit: str) -> None:
    out_before = sorted(os.listdir(tmp_path))
    code, out, err = cli("train", "preview", _config(tmp_path), *argv)
    assert code == 2
    assert limit in usage_line(err, argv[0])
    no_traceback(out, err)
    assert sorted(os.listdir(tmp_path)) == sorted([*out_before, "cfg.yaml"])


@pytest.mark.parametrize("key", ["data.tile_size", "model.tile_size"])
@pytest.mark.parametrize("value", ["200000", "4", "0", "-3"])
def test_config_tile_size_outside_the_limits_is_refused_up_front(tmp_path: Path, key: str, value: str) -> None:
    code, out, err = cli("train", "preview", _config(tmp_path), f"{key}={value}", "--out", tmp_path / "p.png")
    assert code == 2  # a bad config key is a usage error in every training command
    line = line_with(err, key)
    assert "16" in line and "4096" in line and value in line
    no_traceback(out, err)
    assert not (tmp_path / "p.png").exists()


def test_config_tile_size_inside_the_limits_is_accepted() -> None:
    from train.config import TrainConfig, validate

    cfg = TrainConfig()
    for size in (16, 64, 4096):
        cfg.data.tile_size = cfg.model.tile_size = size
        validate(cfg)


@pytest.mark.parametrize("tile", ["3", "0", "-32", "100", "8192"])
def test_binary_predict_tile_outside_the_model_limits_is_a_usage_error(tmp_path: Path, tile: str) -> None:
    code, out, err = cli("binary", "predict", "--model", tmp_path / "model.pt", "--images", tmp_path,
                         "--out", tmp_path / "out", "--tile", tile)
    assert code == 2
    line = usage_line(err, "--tile")
    assert "multiple of 32" in line and "4096" in line
    no_traceback(out, err)
    assert not (tmp_path / "out").exists()


def test_size_guard_is_one_function() -> None:
    from cpsam.cli_types import size_problem

    assert size_problem(64, 32, 4096, 32) is None
    assert "between 32 and 4096 and a multiple of 32, got 3" in size_problem(3, 32, 4096, 32)
    assert "between 1 and 1024, got 2000" in size_problem(2000, 1, 1024)


# --------------------------------------------------------------------------- item 2: export to a full disk


@contextlib.contextmanager
def _full_folder(tmp_path: Path, free_bytes: int) -> Iterator[Path]:
    """A real tmpfs of `free_bytes` where this process may mount one, else a file system that is really full is
    not available: skip (the export's failure was a C++ abort of TorchScript's own writer, which a Python-level
    simulation cannot reproduce)."""
    if not can_mount():
        pytest.skip("cannot mount a tmpfs here")
    with tmpfs(tmp_path / "disk", f"size={free_bytes}") as folder:
        yield folder


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.pt", create_model("cpnet", nbase=[2, 8, 16]))
    with _full_folder(tmp_path, 32 * 1024) as disk:
        # a subprocess: before the fix the process aborted (exit 134), which would take pytest down with it
        done = subprocess.run([sys.executable, "-m", "cpsam", "distill", "export", "--model", str(model),
                               "--out", str(disk / "student.pt")], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
        line = line_with(done.stderr, "cpsam distill export:")
        assert "--out" in line and "student.pt" in line and "no space left" in line.lower()
        no_traceback(done.stdout, done.stderr)
        assert os.listdir(disk) == []


def test_export_to_an_unwritable_out_is_refused_before_the_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    code, out, err = cli("distill", "export", "--model", tmp_path / "missing.pt", "--out", tmp_path / "afile" / "s.pt")
    assert code == 2
    line_with(err, "--out", "afile")
    no_traceback(out, err)


# --------------------------------------------------------------------------- item 4: binary predict's bad images


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random one-channel binary U-Net saved as a run's model.pt (loading code "0")."""
    torch.manual_seed(0)
    net = create_model("resnet10t_unet", in_chans=1, num_classes=2, decoder_div=8)
    return save_checkpoint(tmp_path_factory.mktemp("binary") / "model.pt", net,
                           config={"binary": {"loading_code": "0"}})


def test_binary_predict_refuses_non_finite_and_unreadable_images_and_exits_1(binary_model: Path,
                                                                              tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = RNG.random((64, 64)).astype(np.float32)
    io.write_tiff(images / "good.tif", good)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = good.copy()
        bad[10, 10] = value
        io.write_tiff(images / f"{name}.tif", bad)
    (images / "broken.tif").write_bytes(b"II*\x00" + bytes(40))
    out = tmp_path / "out"
    code, stdout, err = cli("binary", "predict", "--model", binary_model, "--images", images, "--out", out)
    assert code == 1
    for name in ("nan", "inf"):
        assert "NaN/Inf" in line_with(err, f"{name}.tif")
    line_with(err, "broken.tif")
    no_traceback(stdout, err)
    assert sorted(os.listdir(out)) == ["good_masks.tif", "good_prob.tif"]
    assert np.isfinite(io.read_image(out / "good_prob.tif")).all()
    no_temp_files(out)


def test_binary_predict_all_good_images_exit_0(binary_model: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    io.write_tiff(images / "a.tif", RNG.random((64, 96)).astype(np.float32))
    code, stdout, err = cli("binary", "predict", "--model", binary_model, "--images", images,
                            "--out", tmp_path / "out", "--tile", "64")
    assert code == 0, err
    assert io.read_image(tmp_path / "out" / "a_prob.tif").shape == (64, 96)


# --------------------------------------------------------------------------- item 11: prep timelapse


def _stacks(tmp_path: Path, nan_frame: int | None = None) -> tuple[Path, Path]:
    """A (4, 64, 64) float32 movie (frame `nan_frame` all NaN) and its label stack of four squares per frame."""
    movie = RNG.random((4, 64, 64)).astype(np.float32)
    labels = np.zeros((4, 64, 64), np.uint16)
    for k, (y, x) in enumerate(((4, 4), (4, 36), (36, 4), (36, 36)), start=1):
        labels[:, y:y + 20, x:x + 20] = k
        movie[:, y:y + 20, x:x + 20] += 2
    if nan_frame is not None:
        movie[nan_frame] = np.nan
    io.write_tiff(tmp_path / "movie.tif", movie)
    io.write_labels(tmp_path / "movie_masks.tif", labels)
    return tmp_path / "movie.tif", tmp_path / "movie_masks.tif"


@pytest.mark.parametrize(("argv", "option"), [
    (["--crop", "0"], "--crop"),
    (["--crop", "-5"], "--crop"),
    (["--crop", "4", "--border", "2"], "--crop"),
    (["--frames", "0"], "--frames"),
    (["--frames", "-1"], "--frames"),
    (["--border", "-1"], "--border"),
])
def test_timelapse_nonsense_sizes_are_usage_errors(tmp_path: Path, argv: list[str], option: str) -> None:
    movie, masks = _stacks(tmp_path)
    out = tmp_path / "crops"
    code, stdout, err = cli("prep", "timelapse", movie, "--masks", masks, "--out", out, *argv)
    assert code == 2
    usage_line(err, option)
    no_traceback(stdout, err)
    assert not out.exists()


def test_timelapse_api_refuses_nonsense_sizes(tmp_path: Path) -> None:
    from data_prep.timelapse import timelapse_crops

    movie, _ = _stacks(tmp_path)
    with pytest.raises(ValueError, match="--crop"):
        timelapse_crops([movie], tmp_path / "crops", crop=0)
    with pytest.raises(ValueError, match="--frames"):
        timelapse_crops([movie], tmp_path / "crops", frames=0)


def test_timelapse_nan_frame_is_reported_and_skipped_and_the_index_written(tmp_path: Path) -> None:
    movie, masks = _stacks(tmp_path, nan_frame=2)
    out = tmp_path / "crops"
    code, stdout, err = cli("prep", "timelapse", movie, "--masks", masks, "--out", out, "--frames", "4",
                            "--crop", "32", "--border", "2")
    assert code == 0, err
    line = line_with(err, "movie.tif", "frame 2")
    assert "NaN" in line and "skipped" in line
    no_traceback(stdout, err)
    rows = read_index(out)
    assert len(rows) == 3 and not any("t0002" in r.name for r in rows)
    assert "3 crops" in stdout
