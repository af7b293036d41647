"""The seed's seed search: N seeds trained one epoch each, scored by validation KD loss, the best one trained."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_cpnet, write_shared_canonical

from cpsam.cli import main as cpsam_main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two real images: one to train on, one held out (val split)."""
    folder = "bact_bf_mothermachine_baby"
    return write_shared_canonical(tmp_path_factory.mktemp("canon") / "baby",
                                  [(folder, "baby_mmsCMOS_testA", "train"), (folder, "baby_mmsCMOS_testB", "val")],
                                  dataset="baby")


def test_seed_search_trains_the_seed_of_the_lowest_validation_kd_loss(dataset, tmp_path, capsys):
    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--images", str(dataset), "--student", "cpnet-1-32", "--out",
            str(run), "--seed-search", "2", "--size-epochs", "0", "--quiet", "batch_size=2",
            "schedule.samples_per_epoch=2", "schedule.epochs=2", "data.tile_size=64", "data.num_workers=0",
            "log.tensorboard=false", "val.every_epochs=2"]
    assert cpsam_main(argv) == 0
    captured = capsys.readouterr()
    with open(run / "seed_search.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and rows[0]["seed"] != rows[1]["seed"]
    losses = {int(r["seed"]): float(r["val_kd_loss"]) for r in rows}
    best = min(losses, key=losses.get)
    assert f"seed search chose seed {best}" in captured.err and f"(seed {best})" in captured.out
    for seed in losses:  # each trial: one epoch (one step) in its own run folder
        state = torch.load(run / "seed_search" / f"seed_{seed}" / "checkpoints" / "last" / "state.pt",
                           weights_only=False)
        assert state["step"] == 1 and state["config"]["seed"] == seed
    final = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert final["config"]["seed"] == best and final["step"] == 2
    # a rerun finds the finished trials and run, picks the same seed and resumes (no config conflict)
    assert cpsam_main(argv) == 0
    again = capsys.readouterr()
    assert f"seed search chose seed {best}" in again.err and "resuming" in again.err
