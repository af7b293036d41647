"""Blockwise vs in-memory segmentation of one large mosaic of real nuclei: agreement, seams, memory, time.

    python -m benchmarks.bench_blockwise                          # 16384 x 16384, block 2048, 2 workers
    python -m benchmarks.bench_blockwise --size 4096 --larger 8192 --block-size 1024
    python -m benchmarks.bench_blockwise --size 2048 --workers-scaling
    python -m benchmarks.bench_blockwise --model runs/student --size 16384 --larger 4096 --threads 1

The mosaic (`build_mosaic`) is cut from the two 1024 x 1024 DeepCell nuclei images of
../shared/data/fluo_nuclei_deepcell2016 (uint16, with their manual labels): random 320 x 320 crops, each
rotated / flipped at random, laid edge to edge (320 is no divisor of the block sizes, so block seams cut
through the nuclei of the crops). It is written as a tiled TIFF, and each run happens in a fresh process:

- in-memory: `Segmenter.segment(whole image)` in one process (what `cpsam segment` does with one file).
- blockwise: `cpsam segment --blockwise` (a LocalCluster of --workers workers: threads of the command's process
  on a CPU, its default).

Peak memory is the largest sum of the resident set sizes of the run's process and all its children (dask
scheduler, nannies, workers), sampled every 0.1 s with psutil, or the kernel's high-water mark of the run's
main process (ru_maxrss) when that is larger: exact for one-process runs (in-memory; blockwise with thread
workers, the CPU default), a sampled lower bound for worker processes. Printed: time and peak memory of each run,
AP@0.5 of blockwise against in-memory (`cpsam.metrics`), the object-count difference, seam splits
(`seam_splits`), the peak-memory ratio blockwise / in-memory, the memory flatness (the larger over the smaller
blockwise peak of --size and --larger, the same block size), the blockwise time with 1 and 2 workers
(--workers-scaling) and, with --in-memory-larger, the in-memory run at --larger too (its time, peak and ratio).

Memory does not depend on the network beyond one batch of activations: on a CPU, where cyto_0 needs hours for
16384 x 16384, a distilled student (`--model RUN`) measures the memory of the same pipeline in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CPSAM_SHARED", REPO.parent / "shared"))
SOURCES = ("deepcell2016_training_nuclei_set4_crop", "deepcell2016_training_nuclei_set5_crop")
FOLDER = "fluo_nuclei_deepcell2016"
CROP = 320
DIAMETER = 17.0  # the folder's median nucleus diameter is 17.5 px (data/MANIFEST.md)


def build_mosaic(size: int, seed: int = 0, shared: Path = SHARED) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size) uint16, ground truth (size, size) uint32 with ids 1..N) of random CROP x CROP
    crops of the DeepCell nuclei images (each crop rotated by a random multiple of 90 degrees and maybe
    flipped); nuclei cut by a crop's edge stay as the partial objects they become."""
    rng = np.random.default_rng(seed)
    pairs = [(tifffile.imread(shared / "data" / FOLDER / f"{n}_img.tif"),
              tifffile.imread(shared / "data" / FOLDER / f"{n}_masks.tif")) for n in SOURCES]
    image = np.zeros((size, size), np.uint16)
    truth = np.zeros((size, size), np.uint32)
    next_id = 1
    for y0 in range(0, size, CROP):
        for x0 in range(0, size, CROP):
            img, masks = pairs[int(rng.integers(len(pairs)))]
            cy, cx = (int(rng.integers(0, n - CROP + 1)) for n in img.shape)
            ci, cm = img[cy : cy + CROP, cx : cx + CROP], masks[cy : cy + CROP, cx : cx + CROP]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            ci, cm = np.rot90(ci, k), np.rot90(cm, k)
            if flip:
                ci, cm = ci[:, ::-1], cm[:, ::-1]
            h, w = min(CROP, size - y0), min(CROP, size - x0)
            ci, cm = ci[:h, :w], cm[:h, :w]
            ids, inverse = np.unique(cm, return_inverse=True)
            new = np.zeros(len(ids), np.uint32)
            n_new = int((ids > 0).sum())
            new[ids > 0] = np.arange(next_id, next_id + n_new, dtype=np.uint32)
            next_id += n_new
            image[y0 : y0 + h, x0 : x0 + w] = ci
            truth[y0 : y0 + h, x0 : x0 + w] = new[inverse.reshape(cm.shape)]
    return image, truth


def seam_splits(truth: np.ndarray, in_memory: np.ndarray, blockwise: np.ndarray, block_size: int) -> tuple[int, int]:
    """(split, crossing): of the ground-truth objects that cross a block seam and that the in-memory run found
    as one object (an in-memory label with IoU >= 0.5), how many the blockwise run split, i.e. the in-memory
    object's pixels on the two sides of the seam have different majority (non-zero) blockwise ids."""
    from cpsam.metrics.matching import assign, label_overlap  # the project's matching core

    ov = label_overlap(truth, in_memory)
    match = assign(ov, 0.5)
    chosen = match.pairs[match.tp]
    true_to_pred = {int(ov.true_ids[ov.pair_true[k]]): int(ov.pred_ids[ov.pair_pred[k]]) for k in chosen}
    split = crossing = 0
    height, width = truth.shape
    for axis, length in ((0, height), (1, width)):
        for seam in range(block_size, length, block_size):
            lo = slice(max(0, seam - 1), seam)
            hi = slice(seam, seam + 1)
            index_lo = (lo, slice(None)) if axis == 0 else (slice(None), lo)
            index_hi = (hi, slice(None)) if axis == 0 else (slice(None), hi)
            across = np.intersect1d(truth[index_lo], truth[index_hi])
            for t in across[across > 0]:
                p = true_to_pred.get(int(t))
                if p is None:
                    continue
                crossing += 1
                band = slice(max(0, seam - 3 * int(DIAMETER)), seam + 3 * int(DIAMETER))
                window = (band, slice(None)) if axis == 0 else (slice(None), band)
                mem, blk = in_memory[window], blockwise[window]
                coords = np.nonzero(mem == p)
                side = (coords[axis] + band.start) >= seam
                ids_lo, ids_hi = blk[tuple(c[~side] for c in coords)], blk[tuple(c[side] for c in coords)]
                ids_lo, ids_hi = ids_lo[ids_lo > 0], ids_hi[ids_hi > 0]
                if len(ids_lo) and len(ids_hi) and _majority(ids_lo) != _majority(ids_hi):
                    split += 1
    return split, crossing


def _majority(ids: np.ndarray) -> int:
    values, counts = np.unique(ids, return_counts=True)
    return int(values[np.argmax(counts)])


# --------------------------------------------------------------------------- measured runs (fresh processes)

IN_MEMORY = """
import sys, numpy as np, tifffile
from cpsam.models import resolve_model
from cpsam.segment import Segmenter
image = tifffile.imread(sys.argv[2])
masks = Segmenter(resolve_model(sys.argv[1], "cpu"), device="cpu").segment(image, diameter=float(sys.argv[4]))[0].masks
np.save(sys.argv[3], masks)
"""


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run argv; (seconds, peak of the summed RSS of the process and all its descendants, bytes)."""
    import psutil  # only the benchmark needs it

    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        root = psutil.Process(proc.pid)
        peak = 0
        while True:
            # reaped with wait4: its rusage holds the kernel's high-water mark of the process's own RSS, which
            # catches a peak shorter than the sampling interval (exact for a one-process run)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak = max(peak, usage.ru_maxrss * 1024)  # kilobytes on Linux
                break
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with _suppress():
                        total += p.memory_info().rss
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        errors.seek(0)
        err = errors.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, peak


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        import psutil  # only the benchmark needs it

        return kind is not None and issubclass(kind, psutil.Error)


def run_in_memory(model: str, tif: Path, out: Path, diameter: float, env: dict[str, str]) -> tuple[float, int]:
    return measure([sys.executable, "-c", IN_MEMORY, model, str(tif), str(out), str(diameter)], env)


def run_blockwise(model: str, tif: Path, out: Path, block_size: int, workers: int, diameter: float,
                  env: dict[str, str]) -> tuple[float, int]:
    return measure([sys.executable, "-m", "cpsam", "segment", "--blockwise", "--model", model, "--input", str(tif),
                    "--output", str(out), "--block-size", str(block_size), "--workers", str(workers),
                    "--diameter", str(diameter)], env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "weights" / "cyto_0_cpnet_torch.pt"))
    parser.add_argument("--size", type=int, default=16384, help="mosaic side in pixels (default 16384)")
    parser.add_argument("--larger", type=int, default=0,
                        help="also run blockwise on a mosaic of this side (memory flatness; default 2 x --size)")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workers-scaling", action="store_true", help="also time blockwise with 1 worker")
    parser.add_argument("--in-memory-larger", action="store_true",
                        help="also run the in-memory segmentation at --larger (it needs that image's memory)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of every run (default: the cores; 1 on a machine other jobs share)")
    parser.add_argument("--diameter", type=float, default=DIAMETER)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    import zarr  # the blockwise output

    from cpsam.metrics import average_precision  # the project's AP

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    larger = args.larger or 2 * args.size
    numbers: dict[str, object] = {"size": args.size, "larger": larger, "block_size": args.block_size,
                                  "workers": args.workers, "diameter": args.diameter}
    with tempfile.TemporaryDirectory(prefix="bench_blockwise_") as tmp_name:
        tmp = Path(tmp_name)
        image, truth = build_mosaic(args.size)
        tifffile.imwrite(tmp / "mosaic.tif", image, tile=(256, 256), bigtiff=True)
        del image
        mem_s, mem_rss = run_in_memory(args.model, tmp / "mosaic.tif", tmp / "mem.npy", args.diameter, env)
        blk_s, blk_rss = run_blockwise(args.model, tmp / "mosaic.tif", tmp / "blk.zarr", args.block_size,
                                       args.workers, args.diameter, env)
        mem = np.load(tmp / "mem.npy")
        blk = zarr.open_group(str(tmp / "blk.zarr"), mode="r")["labels"][:]
        ap = float(average_precision(mem.astype(np.int64), blk.astype(np.int64), thresholds=[0.5])[0][0])
        split, crossing = seam_splits(truth, mem, blk, args.block_size)
        numbers.update(in_memory_s=mem_s, in_memory_peak_mib=mem_rss / 2**20, blockwise_s=blk_s,
                       blockwise_peak_mib=blk_rss / 2**20, ap50=ap, count_in_memory=int(mem.max()),
                       count_blockwise=int(blk.max()), count_diff_pct=100 * (int(blk.max()) - int(mem.max())) /
                       max(1, int(mem.max())), seam_crossing=crossing, seam_splits=split,
                       memory_ratio=blk_rss / mem_rss)
        del mem, blk, truth
        report(numbers, args.json)
        if args.workers_scaling:
            one_s, one_rss = run_blockwise(args.model, tmp / "mosaic.tif", tmp / "blk1.zarr", args.block_size, 1,
                                           args.diameter, env)
            numbers.update(blockwise_1_worker_s=one_s, blockwise_1_worker_peak_mib=one_rss / 2**20)
            report(numbers, args.json)
        image, _ = build_mosaic(larger, seed=1)
        tifffile.imwrite(tmp / "larger.tif", image, tile=(256, 256), bigtiff=True)
        del image
        big_s, big_rss = run_blockwise(args.model, tmp / "larger.tif", tmp / "big.zarr", args.block_size,
                                       args.workers, args.diameter, env)
        numbers.update(larger_blockwise_s=big_s, larger_blockwise_peak_mib=big_rss / 2**20,
                       memory_flatness=max(big_rss, blk_rss) / min(big_rss, blk_rss))
        report(numbers, args.json)
        if args.in_memory_larger:
            shutil.rmtree(tmp / "big.zarr")
            big_mem_s, big_mem_rss = run_in_memory(args.model, tmp / "larger.tif", tmp / "big_mem.npy",
                                                   args.diameter, env)
            numbers.update(larger_in_memory_s=big_mem_s, larger_in_memory_peak_mib=big_mem_rss / 2**20,
                           larger_memory_ratio=big_rss / big_mem_rss)
    report(numbers, args.json)


def report(numbers: dict[str, object], path: Path | None) -> None:
    """Print the numbers so far (one per line) and write them to `path` as JSON."""
    for key, value in numbers.items():
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}", flush=True)
    print(flush=True)
    if path is not None:
        path.write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
