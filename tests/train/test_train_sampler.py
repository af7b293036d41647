"""Tests of train.sampler.MultiDatasetSampler on small canonical datasets (index.csv only, no images)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.canonical import IndexRow, read_index, write_index
from train.sampler import MultiDatasetSampler, SampleKey

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_dataset(root: Path, name: str, n_objects: list[int], split: str = "train") -> Path:
    """Write root/name/index.csv with one row per entry of n_objects; return the folder."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = [IndexRow(name=f"{name}_{i:03d}", dataset=name, split=split, channels=1, height=64, width=64,
                     n_objects=n, median_diameter=10.0 + i, license="CC0", source="test")
            for i, n in enumerate(n_objects)]
    write_index(folder, rows)
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    """A: 12 rows (2 with < 5 objects), B: 30 rows, C: 60 rows (3 with < 5 objects) plus 4 val rows."""
    a = make_dataset(tmp_path, "A", [3, 4] + [10] * 10)
    b = make_dataset(tmp_path, "B", [8] * 30)
    c = make_dataset(tmp_path, "C", [0, 1, 2] + [20] * 57)
    rows_c = [IndexRow(name=f"Cval_{i}", dataset="C", split="val", channels=1, height=8, width=8, n_objects=9,
                       median_diameter=5.0, license="CC0", source="test") for i in range(4)]
    write_index(c, read_index(c) + rows_c)
    return [a, b, c]


def dataset_frequencies(sampler: MultiDatasetSampler) -> np.ndarray:
    d, _ = sampler.epoch_keys(0)
    return np.bincount(d, minlength=len(sampler.roots)) / len(d)


@pytest.mark.parametrize(
    "weights, expected",
    [([0.5, 0.3, 0.2], [0.5, 0.3, 0.2]), ([2.0, 1.0, 1.0], [0.5, 0.25, 0.25]),
     ("balanced", [1 / 3] * 3), ("size", [10 / 97, 30 / 97, 57 / 97]), (None, [10 / 97, 30 / 97, 57 / 97])],
)
def test_dataset_frequencies_match_weights(folders, weights, expected) -> None:
    sampler = MultiDatasetSampler(folders, weights, samples_per_epoch=100_000, seed=3)
    np.testing.assert_allclose(sampler.dataset_weights, expected, atol=1e-12)
    freq = dataset_frequencies(sampler)
    assert np.all(np.abs(freq - np.asarray(expected)) < 0.01), (freq, expected)


def test_image_weights_respected_within_dataset(folders) -> None:
    names_b = [f"B_{i:03d}" for i in range(30)]
    weight_b = {name: float(i + 1) for i, name in enumerate(names_b)}  # 1..30
    weight_c = np.r_[np.ones(28), np.full(29, 4.0)]  # aligned with C's 57 usable rows
    sampler = MultiDatasetSampler(folders, [0.2, 0.4, 0.4], samples_per_epoch=100_000, seed=11,
                                  image_weights=[None, weight_b, weight_c])
    d, i = sampler.epoch_keys(0)
    for dataset_index, w in ((1, np.arange(1, 31, dtype=float)), (2, np.r_[np.zeros(3), weight_c])):
        expected_p = 0.4 * w / w.sum()
        np.testing.assert_allclose(sampler.probabilities(dataset_index), expected_p, rtol=1e-12)
        counts = np.bincount(i[d == dataset_index], minlength=len(w))
        n = counts.sum()
        assert abs(n / len(d) - 0.4) < 0.01
        assert np.all(counts[w == 0] == 0)
        keep = w > 0
        expected = n * w[keep] / w.sum()
        chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
        dof = int(keep.sum()) - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2  # far beyond the 99.9% quantile would fail
        uniform = np.full(int(keep.sum()), n / keep.sum())
        assert float(((counts[keep] - uniform) ** 2 / uniform).sum()) > 20 * dof  # the test has power
    # A mapping may leave out excluded rows (C_000..C_002), not usable ones; negative weights are refused.
    partial = {f"C_{k:03d}": 1.0 for k in range(3, 60)}
    assert MultiDatasetSampler(folders, samples_per_epoch=10, image_weights=[None, None, partial]).excluded
    # A mapping that lacks a usable name is refused, as are negative image weights.
    with pytest.raises(ValueError, match="lacks"):
        MultiDatasetSampler(folders, samples_per_epoch=10, image_weights=[None, {"B_000": 1.0}, None])
    with pytest.raises(ValueError, match="image_weights"):
        MultiDatasetSampler(folders, samples_per_epoch=10, image_weights=[None, [-1.0] * 30, None])


@pytest.mark.parametrize("world_size, block_size", [(2, 1), (8, 1), (2, 4), (8, 3)])
def test_shards_partition_the_one_process_epoch(folders, world_size, block_size) -> None:
    n = 24 * 40
    single = MultiDatasetSampler(folders, "balanced", samples_per_epoch=n, seed=5, block_size=block_size)
    single.set_epoch(2)
    reference = list(single.iter_positions())
    assert [k.position for k in reference] == list(range(n))
    dataset_index, example_index = single.epoch_keys(2)
    assert [(k.dataset_index, k.example_index) for k in reference] == list(
        zip(dataset_index.tolist(), example_index.tolist(), strict=True))
    shards = []
    for rank in range(world_size):
        s = MultiDatasetSampler(folders, "balanced", samples_per_epoch=n, seed=5, rank=rank,
                                world_size=world_size, block_size=block_size)
        s.set_epoch(2)
        keys = list(s.iter_positions())
        assert len(keys) == len(s) == n // world_size
        blocks = np.asarray([k.position for k in keys]).reshape(-1, block_size)
        assert np.all(np.diff(blocks, axis=1) == 1)  # blocks of consecutive positions
        assert np.all(blocks[:, 0] // block_size % world_size == rank)
        shards.append(keys)
    positions = [k.position for keys in shards for k in keys]
    assert len(set(positions)) == n
    assert sorted(k for keys in shards for k in keys) == reference


def test_iteration_cursor_and_epochs(folders) -> None:
    s = MultiDatasetSampler(folders, samples_per_epoch=64, seed=1, world_size=2, rank=1)
    keys = list(s.iter_positions())
    s.set_cursor(0)
    pairs = list(s)
    assert pairs == [(k.dataset_index, k.name) for k in keys] and s.cursor == 32
    assert list(s) == []  # the epoch does not advance by itself
    s.set_epoch(0)
    assert s.cursor == 32  # same epoch: cursor kept
    s.set_epoch(1)
    assert s.cursor == 0
    epoch1 = list(s)
    assert len(epoch1) == 32 and epoch1 != pairs
    s.set_cursor(0)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    assert s.cursor == 5
    assert first + list(s) == epoch1  # a new iterator starts at the cursor (and the live one is not reused)
    root, row = s.example(keys[0].dataset_index, keys[0].example_index)
    assert row.name == keys[0].name and root == folders[keys[0].dataset_index]
    assert isinstance(keys[0], SampleKey)


def test_same_seed_same_epoch_regardless_of_global_rng(folders) -> None:
    import torch

    s1 = MultiDatasetSampler(folders, [0.2, 0.3, 0.5], samples_per_epoch=4000, seed=7)
    d1, i1 = s1.epoch_keys(4)
    np.random.seed(123)
    random.seed(99)
    torch.manual_seed(42)
    np.random.random(1000)
    s2 = MultiDatasetSampler(folders, [0.2, 0.3, 0.5], samples_per_epoch=4000, seed=7)
    s2.epoch_keys(0)
    d2, i2 = s2.epoch_keys(4)
    assert np.array_equal(d1, d2) and np.array_equal(i1, i2)
    other_epoch = s2.epoch_keys(5)
    other_seed = MultiDatasetSampler(folders, [0.2, 0.3, 0.5], samples_per_epoch=4000, seed=8).epoch_keys(4)
    for d, i in (other_epoch, other_seed):
        assert np.mean((d == d1) & (i == i1)) < 0.1


def run_python(code: str, argument: str, env_extra: dict[str, str]) -> str:
    """stdout of `python -c code argument` in a fresh process run from the repo root."""
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code, argument], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


SUBPROCESS_CODE = """
import json, sys
from train.sampler import MultiDatasetSampler
args = json.loads(sys.argv[1])
s = MultiDatasetSampler(args["folders"], args["weights"], samples_per_epoch=args["n"], seed=args["seed"],
                        rank=args["rank"], world_size=args["world_size"], block_size=args["block_size"])
if args["state"] is not None:
    s.load_state_dict(json.loads(args["state"]))
else:
    s.set_epoch(args["epoch"])
print(json.dumps([list(k) for k in s.iter_positions()]))
"""


def test_resume_in_fresh_process_and_hash_seed_independence(folders) -> None:
    args = {"folders": [str(f) for f in folders], "weights": [0.3, 0.3, 0.4], "n": 600, "seed": 13, "rank": 1,
            "world_size": 3, "block_size": 2}
    s = MultiDatasetSampler(args["folders"], args["weights"], samples_per_epoch=600, seed=13, rank=1,
                            world_size=3, block_size=2)
    s.set_epoch(3)
    full = [list(k) for k in s.iter_positions()]
    s.set_epoch(4)
    s.set_epoch(3)
    cut = int(np.random.default_rng(2024).integers(1, len(s)))
    it = s.iter_positions()
    head = [list(next(it)) for _ in range(cut)]
    state = json.dumps(s.state_dict())  # ints and strings only
    assert json.loads(state)["cursor"] == cut and head == full[:cut]
    resumed = json.loads(run_python(SUBPROCESS_CODE, json.dumps({**args, "state": state}), {"PYTHONHASHSEED": "1"}))
    assert resumed == full[cut:]
    other_hash = json.loads(run_python(SUBPROCESS_CODE, json.dumps({**args, "state": None, "epoch": 3}),
                                       {"PYTHONHASHSEED": "12345"}))
    assert other_hash == full


def test_state_dict_explicit_cursor_and_next_epoch_is_not_a_replay(folders) -> None:
    s = MultiDatasetSampler(folders, samples_per_epoch=80, seed=2, world_size=2)
    it = iter(s)
    [next(it) for _ in range(30)]  # prefetched ahead of training
    state = s.state_dict(cursor=12)  # what training actually consumed
    assert s.cursor == 30 and state["cursor"] == 12
    fresh = MultiDatasetSampler(folders, samples_per_epoch=80, seed=2, world_size=2)
    fresh.load_state_dict(state)
    reference = MultiDatasetSampler(folders, samples_per_epoch=80, seed=2, world_size=2)
    assert list(fresh) == list(reference)[12:]
    fresh.set_epoch(1)
    reference.set_epoch(1)
    assert list(fresh) == list(reference) and len(fresh) == 40
    other_rank = MultiDatasetSampler(folders, samples_per_epoch=80, seed=2, world_size=2, rank=1)
    other_rank.load_state_dict(state)  # rank 0's state serves every rank
    assert other_rank.rank == 1 and other_rank.cursor == 12
    with pytest.raises(ValueError, match="cursor"):
        s.state_dict(cursor=41)


@pytest.mark.parametrize(
    "change, field",
    [({"world_size": 4}, "world_size"), ({"samples_per_epoch": 40}, "samples_per_epoch"),
     ({"weights": [1.0, 2.0, 3.0]}, "fingerprint"), ({"seed": 1}, "seed"), ({"block_size": 2}, "block_size")],
)
def test_load_state_refuses_a_different_setup(folders, change, field) -> None:
    base = {"weights": None, "samples_per_epoch": 80, "seed": 2, "world_size": 2}
    state = MultiDatasetSampler(folders, **base).state_dict()
    other = MultiDatasetSampler(folders, **{**base, **change})
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(state)


def test_exclusions_counted_and_never_sampled(folders) -> None:
    s = MultiDatasetSampler(folders, samples_per_epoch=3000, seed=0)
    assert [(d, n) for d, n, _ in s.excluded] == [(0, "A_000"), (0, "A_001"), (2, "C_000"), (2, "C_001"),
                                                  (2, "C_002")]
    assert {r for _, _, r in s.excluded} == {"fewer than 5 objects"}
    assert [(x["used"], x["excluded"]) for x in s.summary()] == [(10, 2), (30, 0), (57, 3)]  # val rows not read
    line = s.summary_line()
    assert line.startswith("sampler: 3 datasets, 97 examples used, 5 excluded (fewer than 5 objects: 5)")
    assert "A 10/12" in line and "C 57/60" in line
    old_state = s.state_dict()
    s.exclude(1, "B_007", "unreadable image")
    assert s.summary()[1]["used"] == 29 and s.probabilities(1)[7] == 0
    d, i = s.epoch_keys(0)
    sampled = {(int(a), s.datasets[a][b].name) for a, b in zip(d, i, strict=True)}
    assert not sampled & {(d_, n_) for d_, n_, _ in s.excluded}
    assert abs(sum(s.probabilities(k).sum() for k in range(3)) - 1) < 1e-12
    with pytest.raises(ValueError, match="fingerprint"):
        s.load_state_dict(old_state)
    with pytest.raises(ValueError, match="no such example"):
        s.exclude(0, "B_001", "wrong dataset")
    kw = MultiDatasetSampler(folders, samples_per_epoch=10, exclude=[(1, "B_007", "unreadable image")])
    assert kw.fingerprint == s.fingerprint
    none = MultiDatasetSampler(folders, samples_per_epoch=10, min_train_masks=0, split=None)
    assert none.excluded == [] and none.summary()[2]["used"] == 64


def test_empty_dataset_with_weight_raises(folders, tmp_path) -> None:
    few = make_dataset(tmp_path, "FEW", [1, 2, 3])
    with pytest.raises(ValueError, match="FEW: no usable"):
        MultiDatasetSampler([*folders, few], "balanced", samples_per_epoch=10)
    s = MultiDatasetSampler([*folders, few], [1, 1, 1, 0], samples_per_epoch=10)
    assert s.summary()[3]["used"] == 0
    # Excluding the last usable rows of a weighted dataset raises and leaves the sampler unchanged.
    a = MultiDatasetSampler(folders, [1, 1, 1], samples_per_epoch=10)
    for k in range(2, 11):
        a.exclude(0, f"A_{k:03d}", "unreadable")
    before = a.fingerprint
    with pytest.raises(ValueError, match="A: no usable"):
        a.exclude(0, "A_011", "unreadable")
    assert a.fingerprint == before and a.summary()[0]["used"] == 1


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0], [0, 0, 0], "uniform"])
def test_bad_weights_raise(folders, weights) -> None:
    with pytest.raises(ValueError, match="weights"):
        MultiDatasetSampler(folders, weights, samples_per_epoch=10)


def test_bad_sizes_raise(folders) -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiDatasetSampler(folders, samples_per_epoch=100, world_size=8)
    with pytest.raises(ValueError, match="divisible"):
        MultiDatasetSampler(folders, samples_per_epoch=100, world_size=2, block_size=8)
    with pytest.raises(ValueError, match="rank"):
        MultiDatasetSampler(folders, samples_per_epoch=100, world_size=2, rank=2)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        MultiDatasetSampler(folders, samples_per_epoch=0)


def test_works_as_dataloader_sampler(folders) -> None:
    import torch

    s = MultiDatasetSampler(folders, samples_per_epoch=32, seed=4)

    class Rows(torch.utils.data.Dataset):
        def __getitem__(self, key):
            d, name = key
            return d, s.datasets[d][s.datasets[d].names.index(name)].median_diameter

        def __len__(self):
            return len(s)

    batches = list(torch.utils.data.DataLoader(Rows(), batch_size=8, sampler=s))
    assert len(batches) == 4 and s.cursor == 32
    s.set_cursor(0)
    expected = [(d, s.datasets[d][i].median_diameter) for _, d, i, _ in s.iter_positions()]
    got = [(int(d), float(m)) for b in batches for d, m in zip(b[0], b[1], strict=True)]
    assert got == expected
