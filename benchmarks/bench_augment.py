"""Training-data throughput and memory: our per-sample pipeline vs cellpose 4.2's augmentations, per thread.

    python -m benchmarks.bench_augment                  # ~20 s per measurement, memory over 5,000 samples
    python -m benchmarks.bench_augment --quick          # ~2 s per measurement, memory over 500 samples
    python -m benchmarks.bench_augment --samples 200 --rounds 3 --threads 1 --skip-memory

Data: the real annotated images of ../shared/data, written once as canonical datasets (one per folder,
flow cache filled: `data_prep.shared_data.build_shared_datasets`) into a temporary folder (or --canonical).
The images used are the sampler's usable examples (>= 5 objects, as cellpose train_seg's min_train_masks);
every measurement walks the same seeded sequence of them, 256 x 256 output crops, 3 model channels.

Timed, each in crops/s on one thread (torch, numba, OpenMP/MKL at --threads, default 1):
- cellpose (4.2.1.1), inputs prepared as train_seg does: images through `cellpose.train._reshape_norm`
  (3 channels, `normalize_img`, float32, up front), lbl = [cellprob = masks > 0, dY, dX] float32 from the
  cached flows; `transforms.random_rotate_and_resize` with a batch of 1 per crop (train_seg's default
  batch_size=1), scale_range=None (2 ** U(-2, 2)) and rescale = diameter / 30 (our paper preset's scale law);
  `denoise.add_noise` with its default parameters, as a batch of 1 per crop (diams None = 30 px), on the
  crops picked by a seeded U < 0.5 draw. add_noise alone runs on a pool of 64 of rrr's crops.
- ours: `TrainDataset.make_sample` (geometry -> degradation on `DegradeConfig(fraction=0.5)` -> intensity
  -> tensors) with `AugmentConfig.paper()` and `.finetune()`, target modes "warp" and "recompute", on the
  same images held in RAM (`example_arrays` returns the arrays; percentile bounds cached per image before
  timing, as in training), and from the canonical folders on disk with the file cache warm (cache_mb=512,
  every example read into it before timing; the canonical TIFFs are zlib-compressed, so no memory maps)
  and off (cache_mb=0: every sample decodes its image, mask and flow TIFFs again; the OS page cache is
  warm either way, so this is the decode cost, not disk I/O). Pieces for comparison: geometry alone
  (`augment_example`, paper, warp) and degradation alone (`degrade_one` on every crop of the same pool,
  diameter 30 px so that sigmas match add_noise's defaults).
Every measurement first runs a warm-up (numba caches, first calls, and a rate estimate that
sizes the timed loop to ~--seconds over all rounds unless --samples is given), then --rounds timed passes;
measurements alternate cellpose / ours, and the order of the whole list reverses every other round
(A B ... B A), so slow drift from the other jobs on the machine loads both sides alike. Medians reported:
wall crops/s and crops per CPU-second (process CPU time); the headline ratio is the ratio of the wall medians,
and the median of the per-round ratios of the two measurements run back to back is printed before it (on a
shared machine, one pass can run at up to twice the speed of the next).

Memory (a fresh process): `make_loader(TrainDataset(all shared datasets, paper, fraction 0.5),
micro_batch_size=8, num_workers=2)` iterated for 5,000 samples; psutil samples the RSS of the process tree
(main + workers) every 20 ms; peaks and current RSS / anonymous RSS (rss - shared) / PSS at 1,000, 2,500 and
5,000 samples. Reference: cellpose train_seg holds every image (3-channel float32 after _reshape_norm)
and its labels_to_flows output in RAM up front; the figure given is image + 3 float32 planes
[cellprob, dY, dX] per image (labels_to_flows also keeps the masks as a 4th float32 plane: shown too).
Every timing and the memory run happen in fresh child processes (`--child`), with the thread variables set
before numpy / torch / numba load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpsam.cli_types import positive_int

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
TILE = 256
CHANNELS = 3
SEED = 0
SEQUENCE_LENGTH = 4096  # positions cycle through this seeded sequence of examples
POOL = 64  # crops in the pool that add_noise / degrade_one alone run on
DEGRADE_FRACTION = 0.5
CELLPOSE_DIAM_MEAN = 30.0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
MEMORY_CHECKPOINTS = (1000, 2500, 5000)
MEMORY_BATCH = 8
MEMORY_WORKERS = 2
MEMORY_SAMPLE_PERIOD_S = 0.02
MIB = 2**20

# (key, side, description); the table and the timing order follow this list (cellpose / ours alternating)
MEASUREMENTS: tuple[tuple[str, str, str], ...] = (
    ("cp_combo", "cellpose", "rrr + add_noise on 50 % (batch of 1 per crop)"),
    ("ours_paper_warp", "ours", "full pipeline, paper, warp, in memory"),
    ("cp_rrr", "cellpose", "random_rotate_and_resize alone (batch of 1)"),
    ("ours_geometry", "ours", "geometry alone (augment_example, paper, warp)"),
    ("cp_noise", "cellpose", "add_noise alone, default parameters (batch of 1)"),
    ("ours_degrade", "ours", "degradation alone (degrade_one, every crop)"),
    ("ours_paper_recompute", "ours", "full pipeline, paper, recompute, in memory"),
    ("ours_finetune_warp", "ours", "full pipeline, finetune, warp, in memory"),
    ("ours_finetune_recompute", "ours", "full pipeline, finetune, recompute, in memory"),
    ("disk_warm", "ours", "make_sample from disk, paper, warp, file cache warm (512 MB)"),
    ("disk_off", "ours", "make_sample from disk, paper, warp, file cache off (cache_mb=0)"),
)


def thread_env(threads: int) -> dict[str, str]:
    """os.environ with every thread-count variable (OpenMP, MKL, OpenBLAS, numba) set to `threads`."""
    return {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}


def set_threads(threads: int) -> None:
    """Set torch (intra- and inter-op) and numba to `threads` threads in this process."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import numba
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    numba.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- data


def usable_examples(roots: list[Path]):
    """(sampler over all rows of `roots`, list of the (dataset_index, example_index) it can draw)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from train.sampler import MultiDatasetSampler

    sampler = MultiDatasetSampler(roots, split=None, samples_per_epoch=SEQUENCE_LENGTH, seed=SEED)
    examples = [(d, int(i)) for d in range(len(roots)) for i in range(len(sampler.datasets[d]))
                if sampler.probabilities(d)[i] > 0]
    if not examples:
        raise ValueError(f"no usable examples in {', '.join(map(str, roots))}")
    return sampler, examples


def load_examples(sampler, examples: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Every example's arrays in RAM: image (C, H, W) raw dtype, masks (H, W), flows (2, H, W) float32, row."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import numpy as np

    from data_prep.canonical import to_chw

    out = []
    for d, i in examples:
        ds = sampler.datasets[d]
        image = to_chw(np.asarray(ds.image(i)), path=ds.image_path(i))
        flows = ds.flows(i)
        if flows is None:
            raise ValueError(f"{ds.flow_path(i)}: flow cache missing (build the datasets with flows=True)")
        out.append({"image": image if image.ndim == 3 else image[None], "masks": np.asarray(ds.mask(i)),
                    "flows": np.asarray(flows, np.float32), "ignore": None, "row": ds[i], "root": sampler.roots[d]})
    return out


def example_sequence(n_examples: int) -> tuple[list[int], list[bool]]:
    """Seeded (example number per position, cellpose's degrade pick per position), SEQUENCE_LENGTH each."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import numpy as np

    rng = np.random.default_rng(SEED)
    order = rng.integers(n_examples, size=SEQUENCE_LENGTH).tolist()
    picks = (rng.random(SEQUENCE_LENGTH) < DEGRADE_FRACTION).tolist()
    return order, picks


# ---------------------------------------------------------------------------------------------------- timing


def build_steps(roots: list[Path]) -> tuple[dict[str, Callable[[int], bool]], dict[str, Any]]:
    """One callable per measurement: step(position) makes one crop and returns whether it was degraded."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import numpy as np
    import torch
    from cellpose import denoise, models
    from cellpose import train as cp_train
    from cellpose import transforms as cp_transforms

    from train import augment as aug
    from train import degrade as deg
    from train.data import PipelineSpec, SampleKey, TrainDataset, sample_generators

    sampler, examples = usable_examples(roots)
    arrays = load_examples(sampler, examples)
    order, picks = example_sequence(len(examples))

    class InMemoryDataset(TrainDataset):
        """TrainDataset whose examples are arrays in RAM (make_sample unchanged: the production code path)."""

        def example_arrays(self, dataset_index: int, example_index: int) -> dict[str, Any]:
            return by_key[(dataset_index, example_index)]

    by_key = dict(zip(examples, arrays, strict=True))

    def dataset(cls, preset: str, target_mode: str, cache_mb: int = 512) -> TrainDataset:
        cfg = getattr(aug.AugmentConfig, preset)()
        cfg.target_mode = target_mode
        spec = PipelineSpec(TILE, CHANNELS, cfg, deg.DegradeConfig(fraction=DEGRADE_FRACTION))
        ds = cls(sampler, spec, seed=SEED, cache_mb=cache_mb)
        for d, i in examples:  # cached percentile bounds (and a full file cache), as after a first pass
            ds.bounds(d, i, by_key[(d, i)]["image"])
            if cls is TrainDataset and cache_mb > 0:
                ds.example_arrays(d, i)
        return ds

    def sample_step(ds: TrainDataset) -> Callable[[int], bool]:
        def step(position: int) -> bool:
            d, i = examples[order[position % SEQUENCE_LENGTH]]
            return bool(ds.make_sample(SampleKey(0, position, d, i))["degraded"])

        return step

    # cellpose's inputs, made as train_seg makes them (normalized 3-channel float32 images, [cellprob, dY, dX])
    normalize_params = {**models.normalize_default, "normalize": True}
    cp_images = cp_train._reshape_norm([a["image"] for a in arrays], channel_axis=0, normalize_params=normalize_params)
    cp_labels = [np.concatenate([(a["masks"] > 0)[None], a["flows"]]).astype(np.float32) for a in arrays]
    cp_rescale = [max(float(a["row"].median_diameter), aug.MIN_DIAMETER) / CELLPOSE_DIAM_MEAN for a in arrays]
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    def rrr(position: int) -> torch.Tensor:
        j = order[position % SEQUENCE_LENGTH]
        return cp_transforms.random_rotate_and_resize([cp_images[j]], lbls=[cp_labels[j]], scale_range=None,
                                                      bsize=TILE, rescale=[cp_rescale[j]])[0]

    pool = [rrr(k) for k in range(POOL)]  # (1, 3, 256, 256) float32 crops for the degradation-only rows

    def cp_rrr(position: int) -> bool:
        rrr(position)
        return False

    def cp_noise(position: int) -> bool:
        denoise.add_noise(pool[position % POOL])
        return True

    def cp_combo(position: int) -> bool:
        crop = rrr(position)
        if picks[position % SEQUENCE_LENGTH]:
            denoise.add_noise(crop)
            return True
        return False

    geometry_ds = dataset(InMemoryDataset, "paper", "warp")

    def ours_geometry(position: int) -> bool:
        d, i = examples[order[position % SEQUENCE_LENGTH]]
        ex = by_key[(d, i)]
        rng = sample_generators(SEED, 0, position)[0]
        aug.augment_example(ex["image"], ex["masks"], ex["flows"], rng, geometry_ds.spec.augment, TILE,
                            float(ex["row"].median_diameter), bounds=geometry_ds.bounds(d, i, ex["image"]),
                            n_channels=CHANNELS, apply_intensity=False)
        return False

    always = deg.DegradeConfig(fraction=1.0)

    def ours_degrade(position: int) -> bool:
        rng = sample_generators(SEED, 0, position)[1]
        deg.degrade_one(pool[position % POOL][0], deg.draw_degradation(rng, always, CELLPOSE_DIAM_MEAN))
        return True

    steps = {
        "cp_combo": cp_combo, "cp_rrr": cp_rrr, "cp_noise": cp_noise,
        "ours_geometry": ours_geometry, "ours_degrade": ours_degrade,
        "ours_paper_warp": sample_step(dataset(InMemoryDataset, "paper", "warp")),
        "ours_paper_recompute": sample_step(dataset(InMemoryDataset, "paper", "recompute")),
        "ours_finetune_warp": sample_step(dataset(InMemoryDataset, "finetune", "warp")),
        "ours_finetune_recompute": sample_step(dataset(InMemoryDataset, "finetune", "recompute")),
        "disk_warm": sample_step(dataset(TrainDataset, "paper", "warp", cache_mb=512)),
        "disk_off": sample_step(dataset(TrainDataset, "paper", "warp", cache_mb=0)),
    }
    pixels = sum(int(a["masks"].size) for a in arrays)
    info = {"examples": len(examples), "megapixels": pixels / 1e6,
            "sizes": sorted({f"{a['masks'].shape[1]}x{a['masks'].shape[0]}" for a in arrays})}
    return steps, info


def time_steps(step: Callable[[int], bool], start: int, n: int) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, crops degraded) of step(start), ..., step(start + n - 1)."""
    wall, cpu = time.perf_counter(), time.process_time()
    degraded = sum(step(position) for position in range(start, start + n))
    return time.perf_counter() - wall, time.process_time() - cpu, degraded


def run_timing(roots: list[Path], rounds: int, samples: int | None, seconds: float, threads: int) -> dict[str, Any]:
    """Warm up and time every measurement `rounds` times (order reversed every other round); see the docstring."""
    set_threads(threads)
    # imported in the process that runs this measurement only (each side starts fresh)
    import torch

    t0 = time.perf_counter()
    steps, info = build_steps(roots)
    print(f"timing child: {info['examples']} images ({info['megapixels']:.1f} Mpx), setup "
          f"{time.perf_counter() - t0:.1f} s, torch threads {torch.get_num_threads()}", flush=True)
    names = [key for key, _, _ in MEASUREMENTS]
    cursor = dict.fromkeys(names, 0)  # next position per measurement (every crop gets fresh draws)
    per_round: dict[str, int] = {}
    warmup_s = min(2.0, max(0.3, seconds / 10))
    for name in names:  # warm-up: first calls, caches, and a rate estimate
        n_done, wall = 0, 0.0
        while wall < warmup_s or n_done < 4:
            dt, _, _ = time_steps(steps[name], cursor[name], 2)
            cursor[name] += 2
            n_done, wall = n_done + 2, wall + dt
        rate = n_done / wall
        per_round[name] = samples if samples else max(4, round(rate * seconds / rounds))
        print(f"  warm-up {name:>24}: ~{rate:6.1f} crops/s -> {per_round[name]} crops per round", flush=True)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    degraded = dict.fromkeys(names, 0)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            n = per_round[name]
            dt, dc, k = time_steps(steps[name], cursor[name], n)
            cursor[name] += n
            walls[name].append(n / dt)
            cpus[name].append(n / max(dc, 1e-9))
            degraded[name] += k
            print(f"  round {r + 1}: {name:>24} {n / dt:7.1f} crops/s ({n / max(dc, 1e-9):7.1f} per CPU-s)", flush=True)
    return {"info": info, "walls": walls, "cpus": cpus, "per_round": per_round,
            "degraded_fraction": {name: degraded[name] / (per_round[name] * rounds) for name in names}}


# ---------------------------------------------------------------------------------------------------- memory


class TreeSampler:
    """Samples the RSS of this process and all its descendants every `period` s in a thread; keeps the peaks."""

    def __init__(self, period: float = MEMORY_SAMPLE_PERIOD_S) -> None:
        # imported in the process that runs this measurement only (each side starts fresh)
        import psutil

        self.me = psutil.Process()
        self.period = period
        self.peak_total = self.peak_main = self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self, pss: bool = False) -> dict[str, int]:
        """Bytes now: main rss, children rss (sum), total rss, total anonymous rss; total pss when asked."""
        # imported in the process that runs this measurement only (each side starts fresh)
        import psutil

        main, children, anon, total_pss = 0, 0, 0, 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                mem = proc.memory_info()
                total_pss += proc.memory_full_info().pss if pss else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just exited
                continue
            if proc.pid == self.me.pid:
                main = mem.rss
            else:
                children += mem.rss
            anon += mem.rss - mem.shared
        out = {"main": main, "children": children, "total": main + children, "anon": anon}
        if pss:
            out["pss"] = total_pss
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = self.snapshot()
            self.peak_total = max(self.peak_total, snap["total"])
            self.peak_main = max(self.peak_main, snap["main"])
            self.peak_children = max(self.peak_children, snap["children"])
            self._stop.wait(self.period)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cellpose_reference_bytes(sampler, examples: list[tuple[int, int]]) -> tuple[int, int]:
    """(image as 3-channel float32 + 3 float32 planes, the same + the masks plane labels_to_flows keeps), bytes,
    summed over the examples: what cellpose train_seg holds in RAM before its first step."""
    pixels = sum(sampler.datasets[d][i].height * sampler.datasets[d][i].width for d, i in examples)
    return pixels * 4 * (CHANNELS + 3), pixels * 4 * (CHANNELS + 4)


def decoded_bytes(sampler, examples: list[tuple[int, int]]) -> int:
    """Bytes of every example's image, mask and flow cache once decoded (from the TIFF headers): the most that
    one worker's file cache can hold for these datasets (it is also capped at cache_mb)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import numpy as np
    import tifffile

    total = 0
    for d, i in examples:
        ds = sampler.datasets[d]
        for path in (ds.image_path(i), ds.mask_path(i), ds.flow_path(i)):
            if path.is_file():
                with tifffile.TiffFile(path) as tif:
                    series = tif.series[0]
                    total += int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
    return total


def run_memory(roots: list[Path], checkpoints: tuple[int, ...], threads: int) -> dict[str, Any]:
    """Iterate make_loader(num_workers=2) for max(checkpoints) samples; tree RSS at each checkpoint."""
    set_threads(threads)
    # imported in the process that runs this measurement only (each side starts fresh)
    from train import augment as aug
    from train import degrade as deg
    from train.data import PipelineSpec, TrainDataset, make_loader
    from train.sampler import MultiDatasetSampler

    total = max(checkpoints)
    sampler = MultiDatasetSampler(roots, split=None, samples_per_epoch=total, seed=SEED)
    _, examples = usable_examples(roots)
    spec = PipelineSpec(TILE, CHANNELS, aug.AugmentConfig.paper(), deg.DegradeConfig(fraction=DEGRADE_FRACTION))
    dataset = TrainDataset(sampler, spec, seed=SEED)
    loader = make_loader(dataset, micro_batch_size=MEMORY_BATCH, num_workers=MEMORY_WORKERS)
    rows = []
    with TreeSampler() as tree:
        before = tree.snapshot(pss=True)
        seen, start, pending = 0, time.perf_counter(), list(checkpoints)
        for batch in loader:
            seen += int(batch["image"].shape[0])
            while pending and seen >= pending[0]:
                now = tree.snapshot(pss=True)
                rows.append({"samples": pending.pop(0), "seconds": time.perf_counter() - start,
                             "peak_total": tree.peak_total, "peak_main": tree.peak_main,
                             "peak_children": tree.peak_children, **{f"now_{k}": v for k, v in now.items()}})
                print(f"  memory: {rows[-1]['samples']} samples, peak tree RSS {tree.peak_total / MIB:.0f} MiB, "
                      f"{rows[-1]['seconds']:.0f} s", flush=True)
    ref, ref4 = cellpose_reference_bytes(sampler, examples)
    return {"before": before, "rows": rows, "cellpose_bytes": ref, "cellpose_bytes_4planes": ref4,
            "examples": len(examples), "cache_mb": dataset.cache_mb, "decoded": decoded_bytes(sampler, examples)}


# ---------------------------------------------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, mode: str, canonical: Path) -> dict[str, Any]:
    """Run `--child mode` in a fresh process with the thread variables set; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_augment", "--child", mode, "--canonical", str(canonical),
               "--child-json", str(out), "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--seconds", str(args.seconds), "--memory-samples", *map(str, args.memory_samples)]
        if args.samples:
            cmd += ["--samples", str(args.samples)]
        done = subprocess.run(cmd, cwd=REPO, env=thread_env(args.threads))
        if done.returncode != 0:
            raise SystemExit(f"the {mode} child failed (exit {done.returncode})")
        return json.loads(out.read_text())


def print_results(timing: dict[str, Any], memory: dict[str, Any] | None, rounds: int) -> None:
    """The table of every figure, then the ratio lines; the headline ratio is the last line printed."""
    med = {k: statistics.median(v) for k, v in timing["walls"].items()}
    cpu = {k: statistics.median(v) for k, v in timing["cpus"].items()}
    frac = timing["degraded_fraction"]
    print(f"\n| side | measurement | crops/s/thread (wall, median of {rounds}) | crops per CPU-s (median) "
          f"| degraded | rounds, wall crops/s |")
    print("|---|---|---|---|---|---|")
    for key, side, what in MEASUREMENTS:
        per = " / ".join(f"{v:.1f}" for v in timing["walls"][key])
        print(f"| {side} | {what} | {med[key]:.1f} | {cpu[key]:.1f} | {100 * frac[key]:.0f} % | {per} |")
    if memory is not None:
        b = memory["before"]
        print(f"\nmemory: make_loader(micro_batch_size={MEMORY_BATCH}, num_workers={MEMORY_WORKERS}) over "
              f"{memory['examples']} images, paper preset, file cache per worker: at most "
              f"min(cache_mb={memory['cache_mb']}, decoded data {memory['decoded'] / MIB:.0f} MiB); main process "
              f"before the loader starts: RSS {b['main'] / MIB:.0f} MiB")
        print("\n| samples | peak RSS main + workers | peak main | peak workers (sum) | RSS now | anon RSS now "
              "| PSS now | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for r in memory["rows"]:
            print(f"| {r['samples']} | {r['peak_total'] / MIB:.0f} MiB | {r['peak_main'] / MIB:.0f} MiB | "
                  f"{r['peak_children'] / MIB:.0f} MiB | {r['now_total'] / MIB:.0f} MiB | "
                  f"{r['now_anon'] / MIB:.0f} MiB | {r['now_pss'] / MIB:.0f} MiB | {r['seconds']:.0f} |")
        print(f"cellpose train_seg reference (data held up front, grows with the dataset): "
              f"{memory['cellpose_bytes'] / MIB:.0f} MiB (3-channel float32 images + [cellprob, dY, dX] float32), "
              f"{memory['cellpose_bytes_4planes'] / MIB:.0f} MiB with the masks plane labels_to_flows also keeps; "
              f"on top of its process baseline")
    print()
    print(f"geometry alone vs random_rotate_and_resize: {med['ours_geometry'] / med['cp_rrr']:.2f}x")
    print(f"degradation alone vs add_noise: {med['ours_degrade'] / med['cp_noise']:.2f}x")
    print(f"full pipeline finetune vs cellpose: {med['ours_finetune_warp'] / med['cp_combo']:.2f}x (warp), "
          f"{med['ours_finetune_recompute'] / med['cp_combo']:.2f}x (recompute)")
    print(f"recompute vs warp: paper {med['ours_paper_recompute'] / med['ours_paper_warp']:.2f}x, "
          f"finetune {med['ours_finetune_recompute'] / med['ours_finetune_warp']:.2f}x")
    print(f"reading from disk vs in memory (paper, warp): cache warm {med['disk_warm'] / med['ours_paper_warp']:.2f}x,"
          f" cache off {med['disk_off'] / med['ours_paper_warp']:.2f}x")
    paired = [o / c for o, c in zip(timing["walls"]["ours_paper_warp"], timing["walls"]["cp_combo"], strict=True)]
    print(f"full pipeline vs cellpose, paired by round (measured back to back): median "
          f"{statistics.median(paired):.2f}x, range {min(paired):.2f}-{max(paired):.2f}x over {len(paired)} rounds")
    print(f"full pipeline vs cellpose per CPU-second: {cpu['ours_paper_warp'] / cpu['cp_combo']:.2f}x")
    if memory is not None and len(memory["rows"]) > 1:
        first, last = memory["rows"][0], memory["rows"][-1]
        print(f"memory: peak RSS at {last['samples']} / at {first['samples']} samples: "
              f"{last['peak_total'] / first['peak_total']:.3f}x")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (machine shared with "
          f"other jobs)")
    print(f"full pipeline vs cellpose: {med['ours_paper_warp'] / med['cp_combo']:.2f}x crops/s per thread")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="the shared real-image folder")
    parser.add_argument("--canonical", type=Path, default=None,
                        help="where to write (or reuse) the canonical datasets; default: a temporary folder")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="crops per measurement and round (default: sized to ~--seconds per measurement)")
    parser.add_argument("--seconds", type=float, default=20.0, help="target seconds per measurement, all rounds")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed passes per measurement (median)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch / numba / OpenMP threads")
    parser.add_argument("--skip-memory", action="store_true", help="skip the loader memory measurement")
    parser.add_argument("--memory-samples", type=positive_int, nargs="+", default=list(MEMORY_CHECKPOINTS),
                        help="checkpoints (samples) of the memory run")
    parser.add_argument("--quick", action="store_true",
                        help="~2 s per measurement, 2 rounds, memory checkpoints 100 / 250 / 500")
    parser.add_argument("--child", choices=("timing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 2.0, 2
        args.memory_samples = [n // 10 for n in MEMORY_CHECKPOINTS]
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")

    if args.child:
        roots = sorted(p for p in args.canonical.iterdir() if (p / "index.csv").is_file())
        if args.child == "timing":
            result = run_timing(roots, args.rounds, args.samples, args.seconds, args.threads)
        else:
            result = run_memory(roots, tuple(sorted(args.memory_samples)), args.threads)
        args.child_json.write_text(json.dumps(result))
        return 0

    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: the shared data folder is missing (this benchmark needs ../shared/data)")
    # imported in the process that runs this measurement only (each side starts fresh)
    from data_prep.shared_data import build_shared_datasets

    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        canonical = args.canonical or Path(tmp)
        start = time.perf_counter()
        roots = build_shared_datasets(args.data, canonical)
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (shared with other jobs)")
        print(f"{len(roots)} canonical datasets in {canonical} ({time.perf_counter() - start:.1f} s); "
              f"threads {args.threads}; {args.rounds} rounds; "
              f"{f'{args.samples} crops' if args.samples else f'~{args.seconds:g} s'} per measurement", flush=True)
        timing = run_child(args, "timing", canonical)
        memory = None if args.skip_memory else run_child(args, "memory", canonical)
    print_results(timing, memory, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
