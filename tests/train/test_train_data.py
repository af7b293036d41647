"""The training sample pipeline (train.data): replay by key, lazy reads, bad-data checks, preview."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO_ROOT, shared_image_path, shared_masks_path

from cpsam.io import read_image, read_labels
from data_prep.canonical import image_path, write_example, write_index
from train.augment import AugmentConfig
from train.data import PipelineSpec, SampleKey, TrainDataset, find_bad_examples, make_loader, sample_generators
from train.degrade import DegradeConfig
from train.sampler import MultiDatasetSampler


@pytest.fixture(scope="module")
def hela(tmp_path_factory) -> Path:
    """A canonical dataset of four 350-px crops of a real HeLa frame (no flow cache: flows computed on the fly)."""
    pair = ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_02_t075")
    src = shared_image_path(*pair)
    image, labels = read_image(src), read_labels(shared_masks_path(*pair))
    root = tmp_path_factory.mktemp("hela")
    rows = [write_example(root, f"crop{k}", image[y:y + 350, x:x + 350], labels[y:y + 350, x:x + 350],
                          dataset="hela", split="train", license="test", source=str(src))
            for k, (y, x) in enumerate([(0, 0), (0, 350), (350, 0), (350, 700)])]
    write_index(root, rows)
    return root


def _dataset(root: Path, augment: AugmentConfig | None = None, degrade: DegradeConfig | None = None,
             samples: int = 8, seed: int = 3) -> TrainDataset:
    sampler = MultiDatasetSampler([root], samples_per_epoch=samples, seed=seed)
    spec = PipelineSpec(128, 3, augment or AugmentConfig.paper(), degrade or DegradeConfig(fraction=0.5))
    return TrainDataset(sampler, spec, seed=seed)


def test_sample_is_a_pure_function_of_its_key(hela):
    a, b = _dataset(hela), _dataset(hela)
    key = SampleKey(epoch=2, position=5, dataset_index=0, example_index=1)
    first = a[key]
    for _ in range(3):  # other samples in between change nothing (no shared RNG state)
        a[SampleKey(0, 1, 0, 0)]
    again, other = a[key], b[key]
    for name in ("image", "target", "valid", "masks", "diameter", "degraded"):
        assert torch.equal(first[name], again[name]) and torch.equal(first[name], other[name]), name
    assert first["image"].shape == (3, 128, 128) and first["image"].dtype == torch.float32
    assert first["target"].shape == (3, 128, 128) and first["masks"].dtype == torch.int32
    different = a[SampleKey(2, 6, 0, 1)]
    assert not torch.equal(first["image"], different["image"])
    # the three child streams are independent of each other and of global state
    np.random.seed(1)
    torch.manual_seed(1)
    g1 = [g.random(4) for g in sample_generators(0, 1, 2)]
    g2 = [g.random(4) for g in sample_generators(0, 1, 2)]
    assert all(np.array_equal(x, y) for x, y in zip(g1, g2, strict=True)) and not np.array_equal(g1[0], g1[1])


def test_targets_match_the_masks_and_degradation_fraction(hela):
    ds = _dataset(hela, AugmentConfig.finetune(), DegradeConfig(fraction=0.5), samples=64)
    degraded = []
    for k in ds.sampler.iter_positions():
        s = ds[SampleKey(0, k.position, k.dataset_index, k.example_index)]
        cp, flows, masks = s["target"][0], s["target"][1:], s["masks"]
        inside = masks > 0
        # cellprob is the (bilinearly warped) foreground; flows are unit length inside objects
        assert float((cp[inside] > 0.5).float().mean()) > 0.95
        norm = flows.norm(dim=0)[inside]
        assert float((norm > 0.5).float().mean()) > 0.9 and float(norm.max()) < 1.05
        degraded.append(bool(s["degraded"]))
    assert 0.3 < np.mean(degraded) < 0.7


def test_memory_mapped_window_read_equals_full_read(hela, tmp_path):
    """An uncompressed TIFF is memory-mapped and only the crop's window is read; same sample as compressed."""
    import shutil

    root = tmp_path / "mm"
    shutil.copytree(hela, root)
    for p in (root / "images").glob("*.tif"):
        tifffile.imwrite(p, tifffile.imread(p))  # rewrite uncompressed, contiguous
    mm, zl = _dataset(root), _dataset(hela)
    assert isinstance(mm.example_arrays(0, 0)["image"], np.memmap)
    key = SampleKey(0, 3, 0, 2)
    assert torch.equal(mm[key]["image"], zl[key]["image"])


def test_loader_with_workers_gives_the_same_batches(hela):
    ds = _dataset(hela, samples=8)
    plain = [b["image"] for b in make_loader(ds, 4, num_workers=0)]
    ds.sampler.set_epoch(0)
    ds.sampler.set_cursor(0)
    workers = [b["image"] for b in make_loader(ds, 4, num_workers=2)]
    assert len(plain) == len(workers) == 2
    assert all(torch.equal(a, b) for a, b in zip(plain, workers, strict=True))


def test_bad_examples_are_named_and_left_out(hela, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(hela, root)
    nan_image = tifffile.imread(image_path(root, "crop0")).astype(np.float32)
    nan_image[3, 4] = np.nan
    tifffile.imwrite(image_path(root, "crop0"), nan_image)
    (root / "masks" / "crop1.tif").unlink()
    tifffile.imwrite(image_path(root, "crop2"), np.zeros((100, 100), np.uint16))
    bad = {b.name: b.reason for b in find_bad_examples([root], "train")}
    assert bad == {
        "crop0": "image has NaN or Inf pixels",
        "crop1": f"mask file missing ({root / 'masks' / 'crop1.tif'})",
        "crop2": "mask shape (350, 350) does not match image shape (100, 100)",
    }
    sampler = MultiDatasetSampler([root], samples_per_epoch=4, exclude=[(0, n, r) for n, r in bad.items()])
    assert {name for _, name in sampler} == {"crop3"}
    assert "1 examples used, 3 excluded" in sampler.summary_line()


def test_preview_writes_a_grid(hela, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: cpsam_tiny, tile_size: 128}}\ndata: {{train: [{hela}]}}\n"
                      "degrade: {fraction: 0.5}\naugment: {intensity: true}\n")
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "cpsam", "train", "preview", str(config), "--n", "6", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = read_image(out)
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] >= 2 * 146 and grid.std() > 10
