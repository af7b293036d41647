"""Blockwise segmentation of an image larger than memory on dask.distributed, resumable, into a zarr.

    from cpsam.blockwise import segment_blockwise
    result = segment_blockwise("cyto_0", "slide.tif", "slide_labels.zarr", block_size=2048, diameter=17,
                               workers=2)
    result.n_objects                  # labels are in zarr.open("slide_labels.zarr")["labels"]

Steps (each a set of dask tasks; the client only schedules and holds small tables):
1. The whole image's normalization bounds, one pass over the block cores (`cpsam.blockwise.percentiles`).
2. Each block's outer rectangle is segmented by `cpsam.segment.Segmenter.segment_window` with those bounds:
   resized on the whole image's resize grid and run through the whole image's network tiles that touch it
   (`cpsam.window`), so its flows are the in-memory run's flows there; it reads the rectangle plus what those
   tiles need (up to one tile at the network's scale on each side). Its labels are written to
   OUT.zarr/blocks/IY_IX with a done marker (the array's `done` attribute) written last.
3. Touching blocks' labels are matched in their shared rectangle and the ids of all blocks joined and
   renumbered 1..N (`cpsam.blockwise.stitch`).
4. Each block writes its core, through its lookup table, into OUT.zarr/labels (chunks = cores: no two tasks
   write the same chunk); optionally a tiled BigTIFF is written from it; the intermediate blocks are removed
   and the run is marked complete.

Output OUT.zarr (zarr format 2, a group): `labels`, (H, W) uint32, 0 = background, 1..N, chunks of the block
size; attributes `cpsam_blockwise`: the request, the diameter, the normalization bounds, n_objects, complete.

Resume: a run that stopped (killed, Ctrl-C, a worker lost) leaves OUT.zarr incomplete; the same request again
(same input, shape, model, block size, diameter, channels and segmentation settings) reuses the blocks whose
done marker is set and the recorded normalization and diameter. A different request, or a complete OUT.zarr,
is refused (`OutputExistsError`).

Workers: each worker picks its device: the one asked for, else cuda:(worker number mod GPUs) when CUDA is
available, else the CPU; the model is loaded once per process and device (workers that are threads of one
process share it). A LocalCluster gets one worker PROCESS per GPU, or 2 CPU workers that are THREADS of this
process, one task at a time each (torch uses cores // workers threads in each). On a CPU, threads share one
torch / numba runtime and one copy of the model instead of one per process (torch and numba release the GIL
while they compute); `processes=` overrides the choice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpsam import io
from cpsam.blockwise import stitch
from cpsam.blockwise.blocks import Block, block_grid, check_block_size, intersection, neighbour_pairs, overlap_for
from cpsam.blockwise.percentiles import Normalization, TileStats, combine, tile_stats
from cpsam.blockwise.source import ImageSource, open_source
from cpsam.segment import Segmenter

DEFAULT_BLOCK_SIZE = 2048
ATTRS_KEY = "cpsam_blockwise"
CPU_WORKERS = 2
# The central crop a diameter is estimated on (when none is given): this many pixels a side, at most.
ESTIMATE_CROP = 1024


class OutputExistsError(ValueError):
    """OUT.zarr exists and cannot be resumed (a finished run, another request, or not a blockwise output)."""


class ModelLoadError(ValueError):
    """The model cannot be loaded on a worker."""


@dataclass(frozen=True)
class Settings:
    """How each block is segmented (the `Segmenter` and its `segment` options)."""

    channels: tuple[int, int] | None = None
    device: str | None = None
    batch_size: int = 8
    bf16: bool = False
    augment: bool = False
    niter: int | None = None
    flow_threshold: float | None = None  # None: the model's (Segmenter)
    cellprob_threshold: float = 0.0
    min_size: int = 15
    torch_threads: int | None = None


@dataclass
class BlockwiseResult:
    """What a blockwise run produced."""

    output: Path
    shape: tuple[int, int]
    n_objects: int
    diameter: float
    diameter_source: str
    n_blocks: int
    blocks_reused: int
    seconds: float
    normalization: Normalization = field(default_factory=lambda: Normalization(()))


# --------------------------------------------------------------------------- worker side

_SEGMENTERS: dict[tuple[Any, ...], Segmenter] = {}


def _worker_number() -> int:
    """The number of the dask worker running this task (0 outside a worker)."""
    try:
        from distributed import get_worker  # here: only meaningful inside a dask task
        worker = get_worker()
    except (ImportError, ValueError):
        return 0
    name = worker.name
    return name if isinstance(name, int) else int(name) if str(name).isdigit() else abs(hash(name))


def _worker_device(asked: str | None) -> torch.device:
    if asked:
        return torch.device(asked)
    if torch.cuda.is_available():
        return torch.device("cuda", _worker_number() % torch.cuda.device_count())
    return torch.device("cpu")


def _segmenter(model: str | nn.Module, settings: Settings) -> Segmenter:
    """This worker's Segmenter for `model` (loaded once per process and device, and kept)."""
    device = _worker_device(settings.device)
    key = (str(device), model if isinstance(model, str) else id(model), settings.batch_size, settings.bf16)
    if key not in _SEGMENTERS:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if isinstance(model, str):
            from cpsam.models import resolve_model  # here: cpsam.models loads segment_anything (seconds)

            model = resolve_model(model, device)
        _SEGMENTERS[key] = Segmenter(model, device=device, batch_size=settings.batch_size, bf16=settings.bf16)
    return _SEGMENTERS[key]


def _estimate_diameter(model: str | nn.Module, source: ImageSource, settings: Settings) -> tuple[float, str]:
    """(diameter, source) for a run without --diameter: the size model's estimate on the central crop of up to
    ESTIMATE_CROP x ESTIMATE_CROP pixels when the model has one, else the model's own diameter (as in memory)."""
    segmenter = _segmenter(model, settings)
    if segmenter.size_model is None:
        return float(segmenter.model.diam_labels.detach().float().cpu()[0]), "model"
    height, width = source.shape
    h, w = min(height, ESTIMATE_CROP), min(width, ESTIMATE_CROP)
    y0, x0 = (height - h) // 2, (width - w) // 2
    crop = source.read(y0, y0 + h, x0, x0 + w)
    diameter, _ = segmenter.estimate_diameter(crop, channels=settings.channels, augment=settings.augment)
    return float(diameter), "size model (central crop)"


def _n_inputs(model: str | nn.Module, settings: Settings) -> int:
    return _segmenter(model, settings).in_channels


def _tile_stats(source: ImageSource, rect: tuple[int, int, int, int], channels: tuple[int, int] | None,
                n_inputs: int) -> TileStats:
    return tile_stats(source, rect, channels, n_inputs)


def _segment_block(model: str | nn.Module, source: ImageSource, block: Block, out: str, diameter: float,
                   bounds: list[list[float] | None], settings: Settings) -> str:
    """Segment one block's outer rectangle and store its labels in OUT.zarr/blocks/NAME (done marker last)."""
    import zarr  # here: only blockwise runs need zarr

    segmenter = _segmenter(model, settings)
    result = segmenter.segment_window(
        source.read, source.shape, block.outer, normalization=Normalization.from_json(bounds).for_segmenter(),
        diameter=diameter, channels=settings.channels, augment=settings.augment, niter=settings.niter,
        flow_threshold=settings.flow_threshold, cellprob_threshold=settings.cellprob_threshold,
        min_size=settings.min_size,
    )
    labels = result.masks.astype(np.uint32)
    present = stitch.core_labels(labels[block.core_in_outer()])
    group = zarr.open_group(out, mode="r+")
    array = group.require_group("blocks").create_array(
        block.name, shape=labels.shape, dtype=np.uint32, chunks=labels.shape, overwrite=True)
    array[...] = labels
    array.attrs.update({"n_labels": int(labels.max()), "present": present.tolist(), "done": True})
    return block.name


def _match_pair(out: str, a: Block, b: Block) -> np.ndarray:
    """Matches between two touching blocks' labels in the rectangle their outer rectangles share."""
    import zarr  # here: only blockwise runs need zarr

    blocks = zarr.open_group(out, mode="r")["blocks"]
    shared = intersection(a.outer, b.outer)
    if shared is None:
        return np.zeros((0, 2), np.int64)
    crops = []
    for block in (a, b):
        oy, ox = block.outer[0], block.outer[2]
        crops.append(blocks[block.name][shared[0] - oy : shared[1] - oy, shared[2] - ox : shared[3] - ox])
    return stitch.match_labels(crops[0], crops[1])


def _write_core(out: str, block: Block, table: np.ndarray) -> None:
    """OUT.zarr/labels[core] = table[block labels in the core]."""
    import zarr  # here: only blockwise runs need zarr

    group = zarr.open_group(out, mode="r+")
    ys, xs = block.core_in_outer()
    y0, y1, x0, x1 = block.core
    group["labels"][y0:y1, x0:x1] = table[group["blocks"][block.name][ys, xs]]


# --------------------------------------------------------------------------- client side


@contextlib.contextmanager
def _cluster(client: Any, workers: int | None, scheduler_address: str | None, processes: bool | None
             ) -> Iterator[tuple[Any, int | None]]:
    """(a dask Client, torch threads per worker or None) for this run; closes what it started."""
    if client is not None:
        yield client, None
        return
    from distributed import Client, LocalCluster  # here: dask.distributed starts slowly (CLI start-up time)

    if scheduler_address:
        with Client(scheduler_address) as own:
            yield own, None
        return
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = workers or n_gpus or CPU_WORKERS
    threads = max(1, (os.cpu_count() or 1) // n)
    if processes is None:
        processes = n_gpus > 0
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as own:
        yield own, threads


def _model_label(model: str | Path | nn.Module) -> str:
    if isinstance(model, nn.Module):
        return f"module {type(model).__name__}"
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def _open_output(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded state of an unfinished run of the same request at `out` (None: a new output).

    Raises OutputExistsError when `out` exists and cannot be resumed, io.OutputPathError when its folder is
    not writable."""
    import zarr  # here: only blockwise runs need zarr

    if not out.exists():
        io.check_output_dir(out.parent)
        return None
    try:
        group = zarr.open_group(str(out), mode="r")
        state = dict(group.attrs).get(ATTRS_KEY)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        state = None
    if not isinstance(state, dict):
        raise OutputExistsError(f"{out}: exists and is not an unfinished blockwise output (remove it or choose "
                                "another --output)")
    if state.get("complete"):
        raise OutputExistsError(f"{out}: exists (a finished blockwise run of {state['request']['input']}); remove "
                                "it or choose another --output")
    if state.get("request") != request:
        differ = sorted(k for k in set(request) | set(state.get("request") or {})
                        if request.get(k) != (state.get("request") or {}).get(k))
        raise OutputExistsError(f"{out}: exists from a different request (differs in {', '.join(differ)}); remove "
                                "it, or repeat the same command to resume it")
    return state


def _progress(total: int, initial: int, desc: str, show: bool) -> Any:
    from tqdm import tqdm  # here: only the client shows progress

    return tqdm(total=total, initial=initial, unit="block", desc=desc, file=sys.stderr, disable=not show)


def segment_blockwise(
    model: str | Path | nn.Module,
    source: str | Path | ImageSource,
    out: str | Path,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    diameter: float = 0.0,
    channels: Sequence[int] | None = None,
    channel_axis: int | None = None,
    client: Any = None,
    workers: int | None = None,
    scheduler_address: str | None = None,
    processes: bool | None = None,
    device: str | None = None,
    batch_size: int = 8,
    bf16: bool = False,
    augment: bool = False,
    niter: int | None = None,
    flow_threshold: float | None = None,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    bigtiff: str | Path | None = None,
    progress: bool = True,
) -> BlockwiseResult:
    """Segment a zarr / OME-Zarr / TIFF image block by block into OUT.zarr (module docstring).

    Args:
        model: a pretrained name (cyto_0, ...), a model file or run folder (resolved on each worker by
            `cpsam.models.resolve_model`), or a loaded network (sent to the workers once).
        source: the image (`cpsam.blockwise.source.open_source`), 2-D with optional channels.
        out: the output zarr folder (local path); resumed when it holds an unfinished run of the same request.
        block_size: core side in pixels; at least 4 diameters. Blocks are segmented with a halo of
            ceil(2 * diameter) pixels on each side.
        diameter: cell diameter in pixels; 0: estimated by the model's size model on the central crop of
            up to 1024 x 1024 pixels (normalized on its own, as an image of that size would be), or the model's
            own diameter when it has no size model.
        channels: [channel to segment, nuclear channel] as `Segmenter.segment`.
        client / scheduler_address / workers: an existing dask Client, the address of a running scheduler, or
            the number of LocalCluster workers (default: one per GPU, else 2); at most one of them.
        processes: LocalCluster workers are processes (True) or threads of this process (False); default: processes
            when CUDA GPUs are present, else threads (see the module docstring).
        device: torch device for every worker (default: see the module docstring).
        batch_size, bf16, augment, niter, flow_threshold, cellprob_threshold, min_size: as `Segmenter.segment`.
        bigtiff: also write the labels to this tiled BigTIFF (uint32; written atomically).
        progress: show progress bars on stderr.
    Raises SourceError (input), BlockSizeError, OutputExistsError, io.OutputPathError, ImageError (a block
    the segmenter refuses).
    """
    start = time.perf_counter()
    if sum(x is not None for x in (client, workers, scheduler_address)) > 1:
        raise ValueError("give at most one of client, workers, scheduler_address")
    src = source if isinstance(source, ImageSource) else open_source(source, channel_axis)
    out = Path(out)
    chans = None if channels is None else (int(channels[0]), int(channels[1]))
    settings = Settings(channels=chans, device=device, batch_size=batch_size, bf16=bf16, augment=augment,
                        niter=niter, flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                        min_size=min_size)
    request = {
        "input": str(src.path.resolve()), "array": src.array_path, "shape": list(src.shape),
        "model": _model_label(model), "block_size": int(block_size), "diameter": float(diameter),
        "channels": None if chans is None else list(chans),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("device", "batch_size", "torch_threads")},
    }
    if diameter > 0:
        check_block_size(block_size, diameter)
    state = _open_output(out, request)
    with _cluster(client, workers, scheduler_address, processes) as (dask_client, threads):
        settings = Settings(**{**asdict(settings), "torch_threads": threads})
        handle: Any = dask_client.scatter(model, broadcast=True) if isinstance(model, nn.Module) else str(model)
        return _run(dask_client, handle, src, out, request, state, settings, block_size, diameter, bigtiff,
                    progress, start)


def _run(client: Any, handle: Any, src: ImageSource, out: Path, request: dict[str, Any],
         state: dict[str, Any] | None, settings: Settings, block_size: int, diameter: float,
         bigtiff: str | Path | None, progress: bool, start: float) -> BlockwiseResult:
    import zarr  # here: only blockwise runs need zarr
    from distributed import as_completed  # here: dask.distributed starts slowly

    try:
        n_inputs = client.submit(_n_inputs, handle, settings, pure=False).result()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the model: {exc}") from exc
    if state is not None:
        diameter, diameter_source = float(state["diameter"]), str(state["diameter_source"])
        normalization = Normalization.from_json(state["normalization"])
    else:
        if diameter > 0:
            diameter_source = "given"
        else:
            diameter, diameter_source = client.submit(_estimate_diameter, handle, src, settings, pure=False).result()
            print(f"cpsam segment: diameter {diameter:.1f} px ({diameter_source})", file=sys.stderr)
        check_block_size(block_size, diameter)
        cores = [b.core for b in block_grid(src.shape, block_size, 0)]
        futures = client.map(_tile_stats, [src] * len(cores), cores, [settings.channels] * len(cores),
                             [n_inputs] * len(cores), pure=False)
        bar = _progress(len(cores), 0, "normalization", progress)
        stats = []
        for future in as_completed(futures):
            stats.append(future.result())
            bar.update()
        bar.close()
        normalization = combine(stats, n_inputs)
        del stats
        state = {"request": request, "diameter": diameter, "diameter_source": diameter_source,
                 "normalization": normalization.to_json(), "complete": False}
        group = zarr.open_group(str(out), mode="w", zarr_format=2)
        group.require_group("blocks")
        group.attrs[ATTRS_KEY] = state
    check_block_size(block_size, diameter)
    blocks = block_grid(src.shape, block_size, overlap_for(diameter))
    group = zarr.open_group(str(out), mode="r+")
    done_blocks = group.require_group("blocks")

    def is_done(block: Block) -> bool:
        try:
            return bool(done_blocks[block.name].attrs.get("done"))
        except KeyError:
            return False

    todo = [b for b in blocks if not is_done(b)]
    reused = len(blocks) - len(todo)
    if reused:
        print(f"cpsam segment: resuming {out}: {reused} of {len(blocks)} blocks already done", file=sys.stderr)
    bounds = normalization.to_json()
    futures = [client.submit(_segment_block, handle, src, b, str(out), diameter, bounds, settings, pure=False)
               for b in todo]
    bar = _progress(len(blocks), reused, "cpsam segment blocks", progress)
    for future in as_completed(futures):
        future.result()
        bar.update()
    bar.close()
    del futures

    # stitch: match touching blocks, join ids, write the cores
    index = {b.index: k for k, b in enumerate(blocks)}
    pairs = neighbour_pairs(blocks)
    matched = client.map(_match_pair, [str(out)] * len(pairs), [a for a, _ in pairs], [b for _, b in pairs],
                         pure=False)
    matches = [(index[a.index], index[b.index], m) for (a, b), m in zip(pairs, client.gather(matched), strict=True)]
    attrs = [dict(done_blocks[b.name].attrs) for b in blocks]
    tables, n_objects = stitch.relabel_tables([a["n_labels"] for a in attrs],
                                              [np.asarray(a["present"], np.int64) for a in attrs], matches)
    group.create_array("labels", shape=src.shape, dtype=np.uint32, chunks=(block_size, block_size),
                       fill_value=0, overwrite=True)
    written = client.map(_write_core, [str(out)] * len(blocks), blocks, tables, pure=False)
    bar = _progress(len(blocks), 0, "stitch", progress)
    for future in as_completed(written):
        future.result()
        bar.update()
    bar.close()
    if bigtiff is not None:
        write_bigtiff(group["labels"], Path(bigtiff))
    state = {**dict(group.attrs)[ATTRS_KEY], "complete": True, "n_objects": n_objects}
    group.attrs[ATTRS_KEY] = state  # first: a kill before the clean-up below leaves a finished output, not a lost one
    shutil.rmtree(out / "blocks", ignore_errors=True)
    return BlockwiseResult(output=out, shape=src.shape, n_objects=n_objects, diameter=diameter,
                           diameter_source=diameter_source, n_blocks=len(blocks), blocks_reused=reused,
                           seconds=time.perf_counter() - start, normalization=normalization)


def write_bigtiff(labels: Any, path: Path, tile: int = 256) -> None:
    """Write an (H, W) label array (zarr or numpy) to a tiled uint32 BigTIFF, one strip of tiles in memory at a
    time; atomic (no partial file is left)."""
    import tifffile  # here: only needed when a BigTIFF is asked for

    height, width = labels.shape

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, height, tile):
            strip = np.asarray(labels[y0 : min(y0 + tile, height), :], np.uint32)
            for x0 in range(0, width, tile):
                piece = np.zeros((tile, tile), np.uint32)
                part = strip[:, x0 : x0 + tile]
                piece[: part.shape[0], : part.shape[1]] = part
                yield piece

    with io.atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data=tiles(), shape=(height, width), dtype=np.uint32, tile=(tile, tile),
                         bigtiff=True, compression="zlib")

