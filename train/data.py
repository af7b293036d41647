"""The training sample: canonical example -> augmented, degraded crop with its targets.

One pipeline for every model kind and for distillation (which replays samples by their key):

    key (epoch, position, dataset_index, example_index)
    -> read image / mask / flows lazily (memory-mapped window when the TIFF allows, else a bounded
       per-worker cache of decoded files; never the whole corpus in RAM)
    -> per-channel 1-99 percentile normalization of the WHOLE image (bounds cached per image)
    -> geometry (train.augment) -> degradation on a fraction of samples (train.degrade)
    -> intensity augmentation (train.augment) -> dict of tensors.

Every random draw of a sample comes from generators seeded by (seed, epoch, position) only
(`sample_generators`), so one key replays one sample exactly on any machine, in any worker, with
any number of processes. Geometry, degradation and intensity draw from separate child streams,
so switching one of them off does not change the others' draws.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cpsam.dynamics import masks_to_flows
from cpsam.io import InputFileError, read_image
from data_prep.canonical import CanonicalDataset, flow_path, ignore_path, image_path, mask_path, to_chw
from train import augment as aug
from train import degrade as deg
from train.sampler import MultiDatasetSampler

MIN_SIDE = 2  # pixels: the shortest side of a usable mask (a 1 x N strip has no flows to learn)

# child streams of one sample's SeedSequence (their order is part of the replay contract)
_GEOMETRY, _DEGRADE, _INTENSITY = 0, 1, 2


class SampleKey(NamedTuple):
    """What identifies one training sample: the epoch, its global position in the epoch, the example."""

    epoch: int
    position: int
    dataset_index: int
    example_index: int


def sample_generators(seed: int, epoch: int, position: int) -> list[np.random.Generator]:
    """Three independent numpy Generators (geometry, degradation, intensity) for one sample.

    A pure function of (seed, epoch, position): PCG64 streams spawned from SeedSequence([seed, epoch, position]).
    """
    children = np.random.SeedSequence([int(seed), int(epoch), int(position)]).spawn(3)
    return [np.random.Generator(np.random.PCG64(c)) for c in children]


@dataclass(frozen=True)
class PipelineSpec:
    """What the model needs from a sample: crop size (px) and input channels, plus the pipeline configs."""

    tile_size: int
    channels: int
    augment: aug.AugmentConfig
    degrade: deg.DegradeConfig


class _FileCache:
    """A per-process LRU cache of decoded arrays, bounded in bytes (0 = off) and in entries.

    Memory maps count as 0 bytes (the OS pages them in and out), but still count as entries.
    """

    MAX_ENTRIES = 4096

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str, load) -> np.ndarray:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        value = load()
        size = 0 if isinstance(value, np.memmap) else int(value.nbytes)
        if self.max_bytes > 0 and size <= self.max_bytes:
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._items) > self.MAX_ENTRIES:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old
        return value


def _memmap(path: Path) -> np.ndarray | None:
    """A read-only memory map of an uncompressed contiguous TIFF, or None when the file does not allow one."""
    try:
        return tifffile.memmap(path, mode="r")
    except (ValueError, OSError, tifffile.TiffFileError):
        return None


class TrainDataset(Dataset):
    """Map-style dataset over the examples of a MultiDatasetSampler; `ds[key]` builds one sample.

    `key` is a SampleKey (the loader's sampler yields them). Returns a dict of tensors:
      image  float32 (channels, T, T)  normalized, augmented (and maybe degraded) input
      target float32 (3, T, T)         [cellprob in [0, 1], dY, dX] unit flows (the loss scales by 5)
      valid  float32 (T, T)            1 where the loss counts (0 on ignore/ pixels)
      masks  int32 (T, T)              the crop's instance labels (nearest-warped)
      diameter float32 ()              median cell diameter in the crop, px
      degraded bool (), epoch/position/dataset_index/example_index int64 ()
    """

    def __init__(self, sampler: MultiDatasetSampler, spec: PipelineSpec, seed: int, cache_mb: int = 512) -> None:
        self.sampler = sampler
        self.spec = spec
        self.seed = int(seed)
        self.cache_mb = int(cache_mb)
        self._cache: _FileCache | None = None
        self._bounds: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sampler)

    # ------------------------------------------------------------------ file access
    def _files(self) -> _FileCache:
        if self._cache is None:  # created lazily, once per worker process
            self._cache = _FileCache(self.cache_mb * 2**20)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        # workers start with an empty cache (never pickle decoded images into every worker)
        return {**self.__dict__, "_cache": None}

    def _read(self, path: Path, *, chw: bool = False) -> np.ndarray:
        def load() -> np.ndarray:
            mm = _memmap(path) if path.suffix == ".tif" else None
            if mm is None:
                array = read_image(path)
                return to_chw(array, path=path) if chw else array
            if not chw:
                return mm
            # views only (to_chw would copy the whole file): (H, W) -> (1, H, W); (H, W, S<=4) -> (S, H, W)
            if mm.ndim == 2:
                return mm[None]
            if mm.ndim == 3 and mm.shape[-1] <= 4 and mm.shape[0] > 4:
                return np.moveaxis(mm[..., :3], -1, 0)
            return mm

        return self._files().get(str(path), load)

    def example_arrays(self, dataset_index: int, example_index: int) -> dict[str, Any]:
        """Raw arrays of one example: image (C, H, W) (a memory map when possible), masks (H, W),
        flows (2, H, W) float32 or None when not cached, ignore (H, W) bool or None, row (IndexRow)."""
        root, row = self.sampler.example(dataset_index, example_index)
        image = self._read(image_path(root, row.name), chw=True)
        if image.ndim == 2:
            image = image[None]
        masks = self._read(mask_path(root, row.name))
        fpath, ipath = flow_path(root, row.name), ignore_path(root, row.name)
        flows = self._read(fpath) if fpath.exists() else None
        ignore = self._read(ipath) > 0 if ipath.exists() else None
        return {"image": image, "masks": masks, "flows": flows, "ignore": ignore, "row": row, "root": root}

    def bounds(self, dataset_index: int, example_index: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel 1st/99th percentile of the whole image, cached per example (float32 (C,) each)."""
        key = (dataset_index, example_index)
        if key not in self._bounds:
            self._bounds[key] = aug.percentile_bounds_per_channel(np.asarray(image))
        return self._bounds[key]

    # ------------------------------------------------------------------ one sample
    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        key = SampleKey(*key)
        try:
            return self.make_sample(key)
        except InputFileError:
            raise
        except Exception as exc:  # name the example: a worker traceback alone does not say which file
            root, row = self.sampler.example(key.dataset_index, key.example_index)
            raise RuntimeError(f"{image_path(root, row.name)}: building training sample {key} failed: {exc}") from exc

    def make_sample(self, key: SampleKey) -> dict[str, torch.Tensor]:
        """Build the sample of `key` (see the class docstring for the returned tensors).

        Order: geometry (+ targets) -> degradation (a fraction of samples) -> intensity jitter. The
        jitter comes last because the degradation re-normalizes its output (it would undo it).
        """
        spec = self.spec
        rng_geometry, rng_degrade, rng_intensity = sample_generators(self.seed, key.epoch, key.position)
        ex = self.example_arrays(key.dataset_index, key.example_index)
        flows = ex["flows"]
        if flows is None and spec.augment.target_mode == "warp":  # not cached on disk: compute once per worker
            root, name = ex["root"], ex["row"].name
            flows = self._files().get(f"flows:{root}/{name}", lambda: masks_to_flows(np.asarray(ex["masks"])))
        diameter = float(ex["row"].median_diameter)
        crop = aug.augment_example(
            ex["image"], ex["masks"], flows, rng_geometry, spec.augment, spec.tile_size, diameter,
            ignore=ex["ignore"], bounds=self.bounds(key.dataset_index, key.example_index, ex["image"]),
            n_channels=spec.channels, apply_intensity=False,
        )
        # the median cell diameter in the crop (px): what the diameter-scaled blur is relative to
        crop_diameter = max(diameter, aug.MIN_DIAMETER) * crop.geometry.scale
        image = torch.from_numpy(np.ascontiguousarray(crop.image, dtype=np.float32))
        params = deg.draw_degradation(rng_degrade, spec.degrade, crop_diameter)
        if params is not None:
            image = deg.degrade_one(image, params)
        image = image.numpy()
        if spec.augment.intensity:
            image = aug.random_intensity(image, rng_intensity, spec.augment)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(crop.target, dtype=np.float32)),
            "valid": torch.from_numpy(np.ascontiguousarray(crop.valid, dtype=np.float32)),
            "masks": torch.from_numpy(np.ascontiguousarray(crop.masks, dtype=np.int32)),
            "diameter": torch.tensor(crop_diameter, dtype=torch.float32),
            "degraded": torch.tensor(params is not None),
            "epoch": torch.tensor(key.epoch, dtype=torch.int64),
            "position": torch.tensor(key.position, dtype=torch.int64),
            "dataset_index": torch.tensor(key.dataset_index, dtype=torch.int64),
            "example_index": torch.tensor(key.example_index, dtype=torch.int64),
        }


class KeySampler(Sampler[SampleKey]):
    """The DataLoader's sampler: this rank's SampleKeys from (start_epoch, start_cursor) up to end_epoch.

    Defaults: the sampler's current epoch and cursor, to the end of that epoch. The training loop asks for
    every remaining epoch of the run in one stream, so one DataLoader (and its workers, with their file
    and percentile caches) lives for the whole run instead of being rebuilt every epoch. Keys are a pure
    function of (seed, epoch, position) (`MultiDatasetSampler.epoch_keys`), so the stream is the same.
    """

    def __init__(self, sampler: MultiDatasetSampler, start_epoch: int | None = None, start_cursor: int | None = None,
                 end_epoch: int | None = None) -> None:
        self.sampler = sampler
        self.start_epoch = sampler.epoch if start_epoch is None else int(start_epoch)
        self.start_cursor = sampler.cursor if start_cursor is None else int(start_cursor)
        self.end_epoch = self.start_epoch + 1 if end_epoch is None else int(end_epoch)
        if not 0 <= self.start_cursor <= len(sampler):
            raise ValueError(f"start_cursor {self.start_cursor} is outside this rank's epoch of {len(sampler)}")

    def __len__(self) -> int:
        return max(0, (self.end_epoch - self.start_epoch) * len(self.sampler) - self.start_cursor)

    def __iter__(self) -> Iterator[SampleKey]:
        positions = self.sampler.shard_positions()
        cursor = self.start_cursor
        for epoch in range(self.start_epoch, self.end_epoch):
            datasets, examples = self.sampler.epoch_keys(epoch)
            for p in positions[cursor:]:
                yield SampleKey(epoch, int(p), int(datasets[p]), int(examples[p]))
            cursor = 0


def _worker_init(_: int) -> None:
    # one thread per worker: the workers are the parallelism (and oversubscription slows every one)
    torch.set_num_threads(1)


def make_loader(dataset: TrainDataset, micro_batch_size: int, num_workers: int, pin_memory: bool = False,
                keys: KeySampler | None = None) -> DataLoader:
    """A DataLoader of micro-batches of this rank's samples in the sampler's order: `keys`, or by default
    the rest of the sampler's current epoch from its cursor on.

    Keys are drawn in the main process (order and cursor are owned there, not by workers); workers only
    build samples, so the result does not depend on `num_workers`.
    """
    # Workers start from a fork server, not a fork of this process: a process that has already run
    # numba's OpenMP threading layer (the dynamics of a validation or of fine-tuning's first scoring)
    # kills its forked children ("fork() called from a process already using GNU OpenMP").
    context = "forkserver" if num_workers > 0 and "forkserver" in multiprocessing.get_all_start_methods() else None
    return DataLoader(
        dataset,
        batch_size=micro_batch_size,
        multiprocessing_context=context,
        sampler=keys if keys is not None else KeySampler(dataset.sampler),
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


# ---------------------------------------------------------------------------- data checks


@dataclass(frozen=True)
class BadExample:
    """An example left out before training: which file and why."""

    dataset_index: int
    name: str
    path: str
    reason: str


def _tiff_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return tuple(series.shape), np.dtype(series.dtype)


def check_example(root: Path, row, check_pixels: bool = True) -> str | None:
    """Why example `row` of dataset `root` cannot be used (a short reason), or None when it is fine.

    Checks: image and mask files exist and open, the mask is 2-D and matches the image's H x W and the
    index row, the flow cache (if any) is (2, H, W), the mask has objects, and (with `check_pixels`)
    that a floating-point image has no NaN/Inf (integer images cannot hold them, so they are not read).
    """
    ipath, mpath, fpath = image_path(root, row.name), mask_path(root, row.name), flow_path(root, row.name)
    for p, what in ((ipath, "image"), (mpath, "mask")):
        if not p.is_file():
            return f"{what} file missing ({p})"
    try:
        ishape, idtype = _tiff_shape(ipath)
        mshape, _ = _tiff_shape(mpath)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a reason to leave it out
        return f"unreadable TIFF ({type(exc).__name__}: {exc})"
    squeezed = list(mshape)
    while len(squeezed) > 2 and 1 in squeezed:  # extra axes of length 1 (`cpsam.io.squeeze_to_2d`'s rule)
        squeezed.remove(1)
    squeezed = tuple(squeezed)
    if len(squeezed) != 2:
        return f"mask is not 2-D (shape {mshape})"
    if min(squeezed) < MIN_SIDE:
        return (f"mask is {squeezed[0]} x {squeezed[1]} pixels, too small (each side needs at least {MIN_SIDE} "
                "pixels for flows)")
    hw = (ishape[-2:] if len(ishape) == 2 or ishape[0] <= 4 else ishape[:2])
    if tuple(hw) != squeezed:
        return f"mask shape {squeezed} does not match image shape {ishape}"
    if squeezed != (row.height, row.width):
        return f"file shape {squeezed} does not match index.csv ({row.height}, {row.width})"
    if row.n_objects < 1:
        return "mask has no objects"
    if fpath.exists():
        try:
            fshape, _ = _tiff_shape(fpath)
        except Exception as exc:  # noqa: BLE001
            return f"unreadable flow cache ({type(exc).__name__}: {exc})"
        if fshape != (2, *squeezed):
            return f"flow cache shape {fshape} is not (2, {squeezed[0]}, {squeezed[1]})"
    if check_pixels and np.issubdtype(idtype, np.floating):
        image = read_image(ipath)
        if not np.isfinite(image).all():
            return "image has NaN or Inf pixels"
    return None


def find_bad_examples(
    roots: Sequence[str | os.PathLike[str]], split: str | Sequence[str] | None, check_pixels: bool = True,
    threads: int = 4,
) -> list[BadExample]:
    """Check every example of the given canonical datasets (threads; headers only for integer images)."""
    jobs = []
    for d, root in enumerate(roots):
        ds = CanonicalDataset(root, split=split)
        jobs += [(d, Path(root), row) for row in ds]

    def one(job) -> BadExample | None:
        d, root, row = job
        reason = check_example(root, row, check_pixels)
        return None if reason is None else BadExample(d, row.name, str(image_path(root, row.name)), reason)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [b for b in pool.map(one, jobs) if b is not None]
