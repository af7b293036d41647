"""The training loop and the commands that train through it, tried as a careless or hostile user would
(issue 33): stop signals, non-finite weights, run lengths the loop cannot honour, a failed run's folder, two runs
on one folder, a lost best checkpoint, a rerun's report rows.

Everything trains a tiny classic Cellpose net (cpnet [2, 8, 16]) on 96-px crops of a real HeLa image from
../shared/data for a few steps. Signals go to a real `python -m cpsam ...` process once its metrics.csv shows
a step (as tests/train/test_train_loop.py's SIGTERM test).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DIR, cli, line_with, no_traceback, write_pair

from cpsam.io import read_image, read_labels
from cpsam.models import create_model
from cpsam.models.loading import save_checkpoint
from data_prep.canonical import write_example, write_index

FOLDER, NAME = "fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_02_t075"
N_CROPS, SIZE = 6, 96
NET = ["model.name=cpnet", "model.nbase=[1,8,16]", "data.tile_size=64"]
QUIET = ["data.num_workers=0", "log.progress=false", "log.tensorboard=false", "log.every_steps=1"]


def _crops() -> list[tuple[str, np.ndarray, np.ndarray]]:
    source = SHARED_DIR / "data" / FOLDER
    if not source.is_dir():
        pytest.skip(f"{source} is absent: these tests need the project's shared data")
    image, labels = read_image(source / f"{NAME}_img.tif"), read_labels(source / f"{NAME}_masks.tif")
    return [(f"crop{k}", image[200:200 + SIZE, 100 + k * SIZE:100 + (k + 1) * SIZE],
             labels[200:200 + SIZE, 100 + k * SIZE:100 + (k + 1) * SIZE]) for k in range(N_CROPS)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A folder of NAME_img.tif / NAME_masks.tif pairs (finetune's and binary train's input)."""
    root = tmp_path_factory.mktemp("pairs")
    for name, image, labels in _crops():
        write_pair(root, name, image, labels)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A canonical dataset of the same crops; the last one is the validation split."""
    root = tmp_path_factory.mktemp("canonical") / "hela"
    crops = _crops()
    rows = [write_example(root, name, image, labels, dataset="hela", split="val" if k == len(crops) - 1 else "train",
                          license="test", source=FOLDER) for k, (name, image, labels) in enumerate(crops)]
    write_index(root, rows)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny cpnet [2, 8, 16] saved as a cpsam checkpoint (finetune's base, distill's teacher)."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt",
                           create_model("cpnet", nbase=[2, 8, 16], diam_mean=30.0))


def _config(tmp_path: Path, dataset: Path) -> Path:
    """A run config of the tiny net on `dataset` (1 step per epoch of 2 samples)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "model:\n  name: cpnet\n  nbase: [2, 8, 16]\n"
        f"data:\n  train: [{dataset}]\n  val: [{dataset}]\n  tile_size: 64\n  num_workers: 0\n"
        "batch_size: 2\nschedule:\n  kind: constant\n  epochs: 2\n  samples_per_epoch: 2\n"
        "optim:\n  lr: 0.001\nval:\n  every_epochs: 1\n  max_images: 1\n"
        "log:\n  progress: false\n  tensorboard: false\n  every_steps: 1\n")
    return path



def _subprocess(*argv: str | Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cpsam", *[str(a) for a in argv]], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop_after_step(run: Path, proc: subprocess.Popen, signum: int, step: int = 2, timeout: float = 300) -> str:
    """Send `signum` once RUN/metrics.csv shows step `step`; returns the process's output once it ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stdout.read()[-3000:]}")
        path = run / "metrics.csv"
        if path.exists():
            steps = [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("loss")]
            if steps and max(steps) >= step:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"step {step} not reached in {timeout} s")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    return out


def _checkpoint_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=False)["step"])


LONG = ["schedule.epochs=500", "val.every_epochs=0", "checkpoint.every_steps=1000"]  # stopped long before its end


# ---------------------------------------------------------------------------------------------- 1: signals
def test_finetune_stopped_by_sigterm_writes_nothing_after_its_checkpoint_and_the_rerun_one_row(
        pairs, tiny_model, tmp_path):
    run = tmp_path / "run"
    argv = ["finetune", "--model", tiny_model, "--images", pairs, "--out", run, "--val-fraction", "0.2",
            "--size-epochs", "1", "batch_size=2", "schedule.samples_per_epoch=2", *NET[2:], *QUIET]
    proc = _subprocess(*argv, *LONG)
    out = _stop_after_step(run, proc, signal.SIGTERM)
    assert proc.returncode == 143, out[-3000:]
    stopped = _checkpoint_step(run)
    assert 2 <= stopped < 500, out[-2000:]
    assert "stopped by signal 15" in out and "interrupted by SIGTERM" in out, out[-2000:]
    no_traceback(out)
    # nothing after the checkpoint: no size model, no "after" scores, no report
    for name in ("results.csv", "val_report.md", "model.pt_size.npy"):
        assert not (run / name).exists(), name
    assert not list((run / "overlays").glob("*_after.png"))
    # the same command finishes (max_steps is free to change on a rerun) and writes one row; a rerun of the
    # finished run replaces it
    for _ in range(2):
        code, _, err = cli(*argv, *LONG, f"max_steps={stopped + 1}")
        assert code == 0, err[-3000:]
        rows = list(csv.DictReader(open(run / "results.csv")))
        assert len(rows) == 1 and rows[0]["steps"] == str(stopped + 1), rows
    assert (run / "model.pt_size.npy").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_binary_train_stopped_by_a_signal_exits_128_plus_n_with_its_checkpoint(pairs, tmp_path, signum):
    run = tmp_path / "run"
    proc = _subprocess("binary", "train", "--images", pairs, "--out", run, "--model", "resnet10t_unet",
                       "--val-fraction", "0.2", "batch_size=2", "schedule.samples_per_epoch=2", "data.tile_size=64",
                       *QUIET, *LONG)
    out = _stop_after_step(run, proc, signum)
    assert proc.returncode == 128 + signum, out[-3000:]
    assert f"stopped by signal {int(signum)}" in out
    no_traceback(out)
    assert 2 <= _checkpoint_step(run) < 500
    assert not (run / "history.csv").exists() and not (run / "history.png").exists()


def test_distill_stopped_by_sigterm_exits_143_and_fits_no_size_model(dataset, tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = _subprocess("distill", "--teacher", tiny_model, "--images", dataset, "--student", "cpnet-1-32",
                       "--out", run, "--size-epochs", "1", "--quiet", "batch_size=2", "schedule.samples_per_epoch=2",
                       "data.tile_size=64", *QUIET, *LONG)
    out = _stop_after_step(run, proc, signal.SIGTERM)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by signal 15" in out and "->" not in out, out[-3000:]
    no_traceback(out)
    assert not (run / "model.pt_size.npy").exists()


def test_binary_distill_stopped_by_sigint_exits_130_and_the_rerun_finishes(pairs, tmp_path):
    from cpsam.models import create_model

    teacher = save_checkpoint(tmp_path / "teacher.pt", create_model("resnet10t_unet", in_chans=1, num_classes=2))
    run = tmp_path / "run"
    argv = ["binary", "distill", "--teacher", teacher, "--images", pairs, "--out", run, "--student", "resnet10t_unet",
            "batch_size=2", "schedule.samples_per_epoch=2", "data.tile_size=64", *QUIET, *LONG]
    proc = _subprocess(*argv)
    out = _stop_after_step(run, proc, signal.SIGINT)
    assert proc.returncode == 130, out[-3000:]
    assert "stopped by signal 2" in out
    no_traceback(out)
    stopped = _checkpoint_step(run)
    assert 2 <= stopped < 500 and not (run / "history.csv").exists()
    code, _, err = cli(*argv, f"max_steps={stopped + 1}")
    assert code == 0, err[-3000:]
    assert torch.load(run / "model.pt", weights_only=False)["step"] == stopped + 1


# ---------------------------------------------------------------------------------------------- 7: finite model
def test_non_finite_weights_are_never_saved(dataset, tmp_path):
    config = _config(tmp_path, dataset)
    run = tmp_path / "run"
    code, out, err = cli("train", config, "optim.lr=1e39", "schedule.epochs=1", "val.every_epochs=0",
                         f"output_dir={run}")
    assert code == 1, err[-3000:]
    line = line_with(err, "not finite")
    assert "nothing saved" in line and "no checkpoint was written" in line and "optim.lr" in line
    no_traceback(err)
    assert not (run / "model.pt").exists() and not (run / "checkpoints" / "last" / "state.pt").exists()
    assert "trained" not in out


def test_a_nan_streak_cites_only_a_checkpoint_that_exists(dataset, tmp_path):
    config = _config(tmp_path, dataset)
    run = tmp_path / "run"
    # step 1's update makes the weights non-finite, steps 2 and 3 have NaN losses: the streak ends the run
    code, _, err = cli("train", config, "optim.lr=1e39", "schedule.epochs=5", "max_bad_steps=2", "val.every_epochs=0",
                       "checkpoint.every_steps=100", f"output_dir={run}")
    assert code == 1, err[-3000:]
    line = line_with(err, "NaN/Inf loss")
    assert "no checkpoint was written" in line and "intact" not in line
    no_traceback(err)
    assert not (run / "checkpoints" / "last" / "state.pt").exists()


# ---------------------------------------------------------------------------------------------- 8: run length
@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_refuses_a_max_steps_below_one_naming_the_key(dataset, tmp_path, value):
    code, _, err = cli("train", _config(tmp_path, dataset), f"max_steps={value}", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "max_steps must be >= 1" in line_with(err, "max_steps")
    no_traceback(err)
    assert not (tmp_path / "run").exists()


def test_finetune_and_distill_refuse_max_steps_0_in_one_line(pairs, dataset, tiny_model, tmp_path):
    code, out, err = cli("finetune", "--model", tiny_model, "--images", pairs, "--out", tmp_path / "ft", "max_steps=0")
    assert code == 2 and "max_steps must be >= 1" in line_with(err, "max_steps"), err
    no_traceback(err)
    assert not (tmp_path / "ft").exists()  # refused before the run folder, its data or its split are written
    code, out, err = cli("distill", "--teacher", tiny_model, "--images", dataset, "--student", "cpnet-1-32",
                         "--out", tmp_path / "ds", "--quiet", "max_steps=0")
    assert code == 2 and "max_steps must be >= 1" in line_with(err, "max_steps"), err
    no_traceback(err)
    assert "model.pt" not in out and not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------- 9: failed run
def test_a_failed_run_does_not_block_its_corrected_rerun(dataset, tmp_path):
    config = _config(tmp_path, dataset)
    run = tmp_path / "run"
    code, _, err = cli("train", config, f"data.train=[{tmp_path / 'missing'}]", f"output_dir={run}")
    assert code == 1, err
    no_traceback(err)
    code, out, err = cli("train", config, f"output_dir={run}", "schedule.epochs=1")
    assert code == 0, err[-3000:]
    assert "trained 1 steps" in out and (run / "model.pt").is_file()
    # a run that did checkpoint still refuses another config
    code, _, err = cli("train", config, f"output_dir={run}", "schedule.epochs=1", "optim.lr=0.5")
    assert code == 1 and "another config" in err


# ---------------------------------------------------------------------------------------------- 12: lock, best
def test_a_second_run_on_a_folder_in_use_is_refused(dataset, tmp_path):
    from train.loop import lock_run_folder, unlock_run_folder

    run = tmp_path / "run"
    held = lock_run_folder(run)  # as a first `cpsam train` on the folder holds it while it trains
    try:
        code, _, err = cli("train", _config(tmp_path, dataset), f"output_dir={run}")
    finally:
        unlock_run_folder(held)
    assert code == 1
    assert "in use by another run" in line_with(err, str(run))
    no_traceback(err)
    assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
    code, _, err = cli("train", _config(tmp_path, dataset), f"output_dir={run}", "schedule.epochs=1")
    assert code == 0, err[-3000:]


def test_best_checkpoint_lost_to_a_full_disk_is_written_at_the_next_save(dataset, tmp_path, monkeypatch):
    import train.checkpoint as ckpt
    from train.config import load_config
    from train.loop import train

    real_copy, failed = ckpt.copy_atomic, []

    def disk_full_once(src, dst):
        if Path(dst).name == "model.pt" and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(ckpt, "copy_atomic", disk_full_once)
    run = tmp_path / "run"
    result = train(load_config(_config(tmp_path, dataset), [f"output_dir={run}", "schedule.epochs=3"]))
    assert failed and result.step == 3
    best = torch.load(run / "checkpoints" / "best" / "model.pt", weights_only=False)
    state = torch.load(run / "checkpoints" / "best" / "state.pt", weights_only=False)
    assert best["step"] == state["step"] == state["best_step"] == result_best_step(run)
    assert all(torch.equal(best["state_dict"][k], state["model"][k]) for k in best["state_dict"])


def test_a_model_file_lost_to_a_full_disk_fails_the_run_and_the_rerun_writes_it(dataset, tmp_path, monkeypatch):
    """The last save writes the state but not model.pt: the run fails (exit 1, one line), never 'finished' with
    a stale or missing model; the same command then rewrites model.pt from the final checkpoint."""
    import train.loop as loop

    real_save, failed = loop.save_checkpoint, []

    def model_file_disk_full(path, net, **extra):
        if extra.get("step") == 2 and not failed:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return real_save(path, net, **extra)

    monkeypatch.setattr(loop, "save_checkpoint", model_file_disk_full)
    run = tmp_path / "run"
    args = ("train", _config(tmp_path, dataset), f"output_dir={run}", "schedule.epochs=2")
    code, out, err = cli(*args)
    assert failed and code == 1, err[-3000:]
    no_traceback(out, err)
    assert "No space left on device" in line_with(err, "final checkpoint could not be written", "rerun")
    assert torch.load(run / "model.pt", weights_only=False)["step"] == 1  # the previous save's, left as it was
    code, out, err = cli(*args)
    assert code == 0, err[-3000:]
    assert torch.load(run / "model.pt", weights_only=False)["step"] == 2


def result_best_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=False)["best_step"])
