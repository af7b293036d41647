"""`cpsam.blockwise`: lazy sources, streamed normalization, the block grid, stitching, the dask run, the CLI.

End-to-end runs compare blockwise with the in-memory segmentation of the same mosaic of real nuclei
(benchmarks.bench_blockwise.build_mosaic) with the classic cyto_0 model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from benchmarks.bench_blockwise import build_mosaic, seam_splits
from cpsam import transforms
from cpsam.blockwise import (
    BlockSizeError,
    OutputExistsError,
    SourceError,
    open_source,
    segment_blockwise,
)
from cpsam.blockwise.blocks import block_grid, check_block_size, intersection, neighbour_pairs, overlap_for
from cpsam.blockwise.percentiles import whole_image_normalization
from cpsam.blockwise.stitch import core_labels, match_labels, relabel_tables
from cpsam.metrics import average_precision
from cpsam.segment import Segmenter
from tests.conftest import SHARED_DIR, cli, line_with, no_traceback

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- stitching on synthetic blocks


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def stitch_blocks(truth: np.ndarray, block_size: int, overlap: int, segment) -> np.ndarray:
    """Run the stitch rules (match, relabel, compose) on blocks whose 'segmentation' is segment(crop, block)."""
    blocks = block_grid(truth.shape, block_size, overlap)
    outs = [segment(truth[b.outer[0] : b.outer[1], b.outer[2] : b.outer[3]], b) for b in blocks]
    index = {b.index: k for k, b in enumerate(blocks)}
    matches = []
    for a, b in neighbour_pairs(blocks):
        y0, y1, x0, x1 = intersection(a.outer, b.outer)
        ca = outs[index[a.index]][y0 - a.outer[0] : y1 - a.outer[0], x0 - a.outer[2] : x1 - a.outer[2]]
        cb = outs[index[b.index]][y0 - b.outer[0] : y1 - b.outer[0], x0 - b.outer[2] : x1 - b.outer[2]]
        matches.append((index[a.index], index[b.index], match_labels(ca, cb)))
    tables, n = relabel_tables([int(o.max()) for o in outs],
                               [core_labels(o[b.core_in_outer()]) for o, b in zip(outs, blocks, strict=True)], matches)
    final = np.zeros(truth.shape, np.uint32)
    for o, b, t in zip(outs, blocks, tables, strict=True):
        y0, y1, x0, x1 = b.core
        final[y0:y1, x0:x1] = t[o[b.core_in_outer()]]
    assert final.max() == n
    return final


def shuffled_ids(crop: np.ndarray, block) -> np.ndarray:
    """A block's 'segmentation': the truth with its own local ids 1..k in a block-dependent order."""
    ids = np.unique(crop)
    ids = ids[ids > 0]
    rng = np.random.default_rng(hash(block.index) % 2**32)
    lut = np.zeros(int(crop.max()) + 1, np.uint32)
    lut[ids] = rng.permutation(len(ids)) + 1
    return lut[crop]


def test_object_crossing_a_seam_gets_one_id_and_ids_are_consecutive() -> None:
    truth = np.zeros((60, 120), np.uint32)
    truth[disk(truth.shape, 30, 60, 8)] = 1  # crosses the vertical seam at x = 60
    truth[disk(truth.shape, 58, 58, 6)] = 2  # crosses the seam at a corner of the grid (y = 60 is the image edge)
    truth[disk(truth.shape, 10, 15, 5)] = 3  # inside block (0, 0)
    truth[disk(truth.shape, 10, 100, 5)] = 4  # inside block (0, 1)
    final = stitch_blocks(truth, 60, 16, shuffled_ids)
    assert sorted(np.unique(final)) == [0, 1, 2, 3, 4]
    for t in range(1, 5):  # each true object is exactly one final object
        ids = np.unique(final[truth == t])
        assert len(ids) == 1 and ids[0] > 0
        assert (final == ids[0]).sum() == (truth == t).sum()


def test_corner_object_of_four_blocks_gets_one_id() -> None:
    truth = np.zeros((100, 100), np.uint32)
    truth[disk(truth.shape, 50, 50, 9)] = 1
    truth[disk(truth.shape, 20, 20, 5)] = 2
    final = stitch_blocks(truth, 50, 20, shuffled_ids)
    assert len(np.unique(final[truth == 1])) == 1
    assert final.max() == 2


def test_duplicates_in_the_overlap_are_kept_once() -> None:
    # Block B's version of the cell is shifted by one pixel: its centroid lies on the other side of the seam,
    # so both blocks show part of it; the two versions overlap with IoU > 0.5 and become one object.
    truth = np.zeros((40, 80), np.uint32)
    truth[disk(truth.shape, 20, 39.5, 7)] = 1

    def shifted(crop: np.ndarray, block) -> np.ndarray:
        out = shuffled_ids(crop, block)
        return np.roll(out, 1, axis=1) if block.index == (0, 1) else out

    final = stitch_blocks(truth, 40, 16, shifted)
    assert final.max() == 1
    assert set(np.unique(final[truth == 1])) == {1}


def test_touching_cells_at_a_seam_stay_two() -> None:
    truth = np.zeros((40, 80), np.uint32)
    truth[10:30, 30:40] = 1  # left of the seam at x = 40
    truth[10:30, 40:50] = 2  # right of it, touching cell 1
    final = stitch_blocks(truth, 40, 16, shuffled_ids)
    assert final.max() == 2
    assert len(np.unique(final[truth == 1])) == 1 and len(np.unique(final[truth == 2])) == 1
    assert np.unique(final[truth == 1])[0] != np.unique(final[truth == 2])[0]


def test_match_labels_iou_rule() -> None:
    a = np.zeros((10, 10), np.uint16)
    b = np.zeros((10, 10), np.uint16)
    a[0:4, 0:4] = 1
    b[0:4, 0:3] = 5  # IoU 12 / 16 = 0.75: a match
    a[6:10, 6:10] = 2
    b[6:10, 9:10] = 7  # IoU 4 / 16 = 0.25: not a match
    assert match_labels(a, b).tolist() == [[1, 5]]
    assert match_labels(a, np.zeros_like(b)).shape == (0, 2)


def test_relabel_tables_without_labels() -> None:
    tables, n = relabel_tables([0, 0], [np.zeros(0, np.int64)] * 2, [])
    assert n == 0 and [t.tolist() for t in tables] == [[0], [0]]


# --------------------------------------------------------------------------- block grid


def test_block_grid_covers_the_image_once_with_halos() -> None:
    blocks = block_grid((1000, 700), 256, 40)
    cover = np.zeros((1000, 700), np.int32)
    for b in blocks:
        y0, y1, x0, x1 = b.core
        cover[y0:y1, x0:x1] += 1
        oy0, oy1, ox0, ox1 = b.outer
        assert oy0 == max(0, y0 - 40) and oy1 == min(1000, y1 + 40)
        assert ox0 == max(0, x0 - 40) and ox1 == min(700, x1 + 40)
    assert (cover == 1).all() and len(blocks) == 4 * 3
    assert len(neighbour_pairs(blocks)) == 4 * 2 + 3 * 3 + 2 * 3 * 2  # 4 x 3 blocks: horizontal, vertical, diagonals
    assert overlap_for(17.2) == 35


def test_block_smaller_than_four_diameters_is_refused() -> None:
    check_block_size(120, 30)
    with pytest.raises(BlockSizeError, match="smaller than 4 cell diameters"):
        check_block_size(119, 30)


# --------------------------------------------------------------------------- sources and normalization


def test_sources_read_rectangles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 60000, (300, 200), dtype=np.uint16)
    rgb = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    cyx = rng.integers(0, 255, (2, 130, 110), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", gray, tile=(64, 64))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    zarr.create_array(str(tmp_path / "plain.zarr"), data=cyx, chunks=(1, 64, 64))
    ome = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=2)
    ome.create_array("0", data=cyx[None, :, None], chunks=(1, 1, 1, 64, 64))
    ome.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                 "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                                          {"name": "z", "type": "space"}, {"name": "y", "type": "space"},
                                          {"name": "x", "type": "space"}]}]
    src = open_source(tmp_path / "tiled.tif")
    assert src.shape == (300, 200) and src.n_channels == 1
    np.testing.assert_array_equal(src.read(70, 140, 10, 150), gray[70:140, 10:150])
    src = open_source(tmp_path / "rgb.tif")
    assert src.shape == (120, 90) and src.n_channels == 3
    np.testing.assert_array_equal(src.read(5, 50, 7, 80), rgb[5:50, 7:80])
    for name in ("plain.zarr", "ome.zarr"):
        src = open_source(tmp_path / name)
        assert src.shape == (130, 110) and src.n_channels == 2, name
        np.testing.assert_array_equal(src.read(3, 99, 20, 110), cyx[:, 3:99, 20:110].transpose(1, 2, 0))


def test_source_errors(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown format"):
        open_source(tmp_path / "a.png")
    zarr.create_array(str(tmp_path / "stack.zarr"), data=np.zeros((4, 5, 30, 40), np.uint8))
    with pytest.raises(SourceError, match="not 2-D"):
        open_source(tmp_path / "stack.zarr")
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.tif")


@pytest.mark.parametrize(("shape", "channels", "n_inputs"), [
    ((500, 300), None, 2),  # every pixel (below 224**3)
    ((3400, 3400), None, 2),  # above 224**3 pixels: cellpose's strided subsample
    ((3, 400, 350), [0, 0], 2),  # grayscale = channel mean (non-integer float32 values)
    ((2, 400, 350), [2, 1], 3),
])
def test_streamed_normalization_equals_in_memory(tmp_path: Path, shape, channels, n_inputs) -> None:
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 300.0, shape).astype(np.uint16)
    zarr.create_array(str(tmp_path / "im.zarr"), data=image, chunks=tuple(min(s, 512) for s in shape))
    src = open_source(tmp_path / "im.zarr")
    tiles = [b.core for b in block_grid(src.shape, 700, 0)]
    norm = whole_image_normalization(src, tiles, channels, n_inputs)
    x = transforms.select_channels(transforms.to_channels_last(image), channels, n_inputs)
    expected = transforms.normalize_percentile(x)
    got = transforms.normalize_with_bounds(x, norm.for_segmenter())
    np.testing.assert_array_equal(got, expected)  # bit-identical
    assert norm.bounds[n_inputs - 1] is None or channels == [2, 1]  # the zero channel has no contrast


# --------------------------------------------------------------------------- the dask run on real nuclei


@pytest.fixture(scope="module")
def cyto0_path() -> Path:
    path = SHARED_DIR / "weights" / "cyto_0_cpnet_torch.pt"
    if not path.exists() or not (SHARED_DIR / "data" / "fluo_nuclei_deepcell2016").exists():
        pytest.skip(f"{SHARED_DIR}: the cyto_0 weights and the DeepCell nuclei are needed")
    return path


def in_memory(model_path: Path, image: np.ndarray) -> np.ndarray:
    from cpsam.models import resolve_model

    return Segmenter(resolve_model(str(model_path), "cpu"), device="cpu").segment(image, diameter=17)[0].masks


def test_blockwise_matches_in_memory_on_a_small_mosaic(cyto0_path: Path, tmp_path: Path) -> None:
    image, truth = build_mosaic(384, seed=3)
    tifffile.imwrite(tmp_path / "m.tif", image, tile=(128, 128))
    result = segment_blockwise(str(cyto0_path), tmp_path / "m.tif", tmp_path / "out.zarr", block_size=192,
                               diameter=17, workers=2, processes=False, progress=False,
                               bigtiff=tmp_path / "out.tif")
    labels = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["labels"][:]
    mem = in_memory(cyto0_path, image)
    assert result.n_blocks == 4 and labels.max() == result.n_objects
    assert sorted(np.unique(labels))[1:] == list(range(1, result.n_objects + 1))
    ap = average_precision(mem, labels.astype(np.int64), thresholds=[0.5])[0][0]
    assert ap >= 0.99, ap  # blocks on the whole image's resize and tile grid (cpsam.window)
    assert abs(int(labels.max()) - int(mem.max())) <= 0.005 * mem.max()
    split, crossing = seam_splits(truth, mem, labels, 192)
    assert crossing >= 3 and split == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), labels)
    assert not (tmp_path / "out.zarr" / "blocks").exists()
    with pytest.raises(OutputExistsError, match="finished"):
        segment_blockwise(str(cyto0_path), tmp_path / "m.tif", tmp_path / "out.zarr", block_size=192, diameter=17,
                          workers=1, processes=False, progress=False)


KILL_SCRIPT = """
import sys
from cpsam.blockwise import segment_blockwise
segment_blockwise(sys.argv[1], sys.argv[2], sys.argv[3], block_size=128, diameter=17, workers=1, processes=False,
                  progress=False)
"""


def test_killed_run_resumes_from_the_blocks_done(cyto0_path: Path, tmp_path: Path) -> None:
    image, _ = build_mosaic(256, seed=5)
    tifffile.imwrite(tmp_path / "m.tif", image)
    out = tmp_path / "out.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(cyto0_path), str(tmp_path / "m.tif"), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    done: list[str] = []
    while time.time() < deadline and proc.poll() is None:
        blocks = out / "blocks"
        markers = [p / ".zattrs" for p in blocks.iterdir()] if blocks.exists() else []
        done = [m.parent.name for m in markers if m.exists() and "done" in m.read_text()]
        if done:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(done) < 4
    result = segment_blockwise(str(cyto0_path), tmp_path / "m.tif", out, block_size=128, diameter=17, workers=1,
                               processes=False, progress=False)
    assert result.blocks_reused >= len(done)
    resumed = zarr.open_group(str(out), mode="r")["labels"][:]
    fresh = segment_blockwise(str(cyto0_path), tmp_path / "m.tif", tmp_path / "fresh.zarr", block_size=128,
                              diameter=17, workers=1, processes=False, progress=False)
    np.testing.assert_array_equal(resumed, zarr.open_group(str(tmp_path / "fresh.zarr"), mode="r")["labels"][:])
    assert result.n_objects == fresh.n_objects > 0


# --------------------------------------------------------------------------- the command line


def test_cli_errors(tmp_path: Path, cyto0_path: Path) -> None:
    image, _ = build_mosaic(256, seed=1)
    tifffile.imwrite(tmp_path / "m.tif", image)
    (tmp_path / "m.png").write_bytes(b"x")
    zarr.create_array(str(tmp_path / "stack.zarr"), data=np.zeros((4, 5, 30, 40), np.uint8))
    base = ["segment", "--model", cyto0_path]
    cases = [
        (["--blockwise", "--input", tmp_path / "m.png", "--output", tmp_path / "o.zarr"], "unknown format"),
        (["--blockwise", "--input", tmp_path / "stack.zarr", "--output", tmp_path / "o.zarr"], "not 2-D"),
        (["--blockwise", "--input", tmp_path / "m.tif", "--output", tmp_path / "o.zarr", "--block-size", "60",
          "--diameter", "17"], "smaller than 4 cell diameters"),
        (["--input", tmp_path / "m.tif", "--output", tmp_path / "o", "--block-size", "512"], "only apply with"),
        (["--blockwise", "--input", tmp_path / "m.tif", "--output", tmp_path / "o.zarr", "--workers", "2",
          "--dask-scheduler", "tcp://127.0.0.1:1"], "not both"),
        (["--blockwise", "--input", tmp_path / "m.tif", "--output", tmp_path / "o.zarr", "--no-worker-processes",
          "--dask-scheduler", "tcp://127.0.0.1:1"], "applies to local workers"),
        (["--input", tmp_path / "m.tif", "--output", tmp_path / "o", "--worker-processes"], "only apply with"),
        (["--blockwise", "--input", tmp_path / "m.tif", "--output", tmp_path / "m.tif", "--diameter", "17"],
         "not an unfinished blockwise output"),
    ]
    for argv, words in cases:
        code, out, err = cli(*base, *argv)
        assert code == 2, (argv, err)
        line_with(err, words)
        no_traceback(out, err)
    assert not (tmp_path / "o.zarr").exists()


def test_cli_refusals_before_and_failures_while_running(tmp_path: Path, cyto0_path: Path, monkeypatch) -> None:
    """Under a launcher (every rank would write one OUT.zarr) and a --bigtiff nobody can write: refused up front
    (exit 2, nothing written); an unreachable scheduler: one line, exit 1."""
    tifffile.imwrite(tmp_path / "m.tif", build_mosaic(256, seed=1)[0])
    base = ["segment", "--model", cyto0_path, "--blockwise", "--input", tmp_path / "m.tif", "--diameter", "17"]
    (tmp_path / "a_file").write_bytes(b"x")
    code, out, err = cli(*base, "--output", tmp_path / "o.zarr", "--bigtiff", tmp_path / "a_file" / "l.tif")
    assert code == 2 and "--bigtiff" in line_with(err, "a_file"), err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = cli(*base, "--output", tmp_path / "o.zarr")
    assert code == 2 and "--workers" in line_with(err, "not under torchrun"), err
    monkeypatch.delenv("WORLD_SIZE")
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # the command runs in this process
        code, out, err = cli(*base, "--output", tmp_path / "o.zarr", "--dask-scheduler", "tcp://127.0.0.1:1")
    assert code == 1 and "tcp://127.0.0.1:1" in line_with(err, "--dask-scheduler", "resume"), err
    no_traceback(out, err)
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.slow
def test_cli_blockwise_with_worker_processes_on_a_1024_mosaic(cyto0_path: Path, tmp_path: Path) -> None:
    """The 1024 x 1024 proof: 2 worker processes through the CLI, against the in-memory run of the same mosaic."""
    image, truth = build_mosaic(1024, seed=0)
    tifffile.imwrite(tmp_path / "m.tif", image, tile=(256, 256))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cpsam", "segment", "--blockwise", "--model", str(cyto0_path),
                           "--input", str(tmp_path / "m.tif"), "--output", str(tmp_path / "out.zarr"),
                           "--block-size", "512", "--workers", "2", "--worker-processes", "--diameter", "17"],
                          env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr
    labels = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["labels"][:]
    mem = in_memory(cyto0_path, image)
    ap = average_precision(mem, labels.astype(np.int64), thresholds=[0.5])[0][0]
    assert ap >= 0.99, ap
    assert abs(int(labels.max()) - int(mem.max())) <= 0.005 * mem.max()
    split, crossing = seam_splits(truth, mem, labels, 512)
    assert crossing > 10 and split == 0


def test_existing_scheduler_and_estimated_diameter(cyto0_path: Path, cyto0_net, cyto_size_model,
                                                    tmp_path: Path) -> None:
    """A loaded network (sent to the workers), --dask-scheduler ADDRESS (here an in-process cluster's) and
    --diameter 0: the size model's estimate on the central crop, recorded in the output's attributes."""
    from distributed import LocalCluster

    cyto0_net.size_model = cyto_size_model

    image, _ = build_mosaic(256, seed=2)
    zarr.create_array(str(tmp_path / "m.zarr"), data=image, chunks=(128, 128))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = segment_blockwise(cyto0_net, tmp_path / "m.zarr", tmp_path / "out.zarr", block_size=256,
                                   diameter=0, scheduler_address=cluster.scheduler_address, progress=False)
    assert result.diameter_source == "size model (central crop)"
    assert 10 < result.diameter < 30, result.diameter
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["cpsam_blockwise"]
    assert attrs["complete"] and attrs["n_objects"] == result.n_objects > 10
    assert attrs["diameter"] == result.diameter
