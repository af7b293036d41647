"""Many images over many processes: which rank does which file, and what the ranks tell each other.

A run launched by `torchrun --nproc_per_node N` or `accelerate launch --num_processes N` has N processes
(ranks); the launcher sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). `RankContext`
reads them (one process without them), `process_group` starts torch.distributed for the few small Python
objects the ranks exchange (the plan, the summary rows, a progress counter), and `balanced_shares` splits a
file list into disjoint shares of about equal pixel count:

    ctx = RankContext.from_env()
    with process_group(ctx):
        shares = balanced_shares(files, ctx.world_size)      # the same on every rank
        for path in shares[ctx.rank]: ...

The split is the classic greedy longest-processing-time rule: files by decreasing pixel count (ties by
list position) each go to the rank with the least pixels so far (ties to the lowest rank). It is a pure
function of the list and the pixel counts, so every rank computes the same shares, each file is in exactly
one, and the largest share exceeds the mean by at most one file's pixels.

The exchanged objects are small, so the group always uses gloo (CPU tensors), also on GPU runs: NCCL would
need every object on the GPU and buys nothing here. Each rank uses its own device (`RankContext.device`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tifffile
import torch
import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")

# how long a rank waits for the others at a collective (the slowest rank's whole share comes before the
# final gather): a day, instead of torch's 30-minute default
GROUP_TIMEOUT = datetime.timedelta(hours=24)
PROGRESS_POLL_S = 0.5  # how often rank 0's progress bar reads the shared counter


# --------------------------------------------------------------------------- who am I


@dataclass(frozen=True)
class RankContext:
    """This process's place in a run of `world_size` processes (one process: rank 0 of 1).

    Args:
        rank: 0 .. world_size - 1 (global rank).
        world_size: number of processes.
        local_rank: rank on this machine, the GPU index a rank uses (cuda:LOCAL_RANK).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} (local rank {self.local_rank}) "
                             "is not a valid process placement")

    @classmethod
    def from_env(cls) -> RankContext:
        """The placement the launcher (torchrun, accelerate launch) set in WORLD_SIZE / RANK / LOCAL_RANK."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise ValueError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers ({exc})") from None
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device | None = None) -> torch.device:
        """This rank's device: `requested` as given when it names an index or is not CUDA; plain "cuda"
        (or nothing, with CUDA available) -> cuda:LOCAL_RANK (one GPU per rank of a machine); else cpu."""
        if requested is None:
            requested = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if requested.type == "cuda" and requested.index is None:
            return torch.device("cuda", self.local_rank if self.distributed else 0)
        return requested


@contextlib.contextmanager
def process_group(ctx: RankContext) -> Iterator[None]:
    """Start the torch.distributed group of a multi-process run (gloo, env://) unless one is already running
    (an `accelerate` script that calls us; with NCCL, this rank's GPU becomes the current CUDA device); stop it at
    the end if it was started here. The commands call `barrier` before leaving the block on their normal path,
    so no rank destroys the group while another still uses it. One process: nothing."""
    started = False
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size, timeout=GROUP_TIMEOUT)
        started = True
    elif ctx.distributed and dist.get_backend() == "nccl" and torch.cuda.is_available():
        # NCCL's object collectives stage through the CURRENT CUDA device: it must be this rank's own, or every
        # rank of a machine would use cuda:0 (a script that started the group may not have set it)
        torch.cuda.set_device(ctx.device(torch.device("cuda")))
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def _grouped(ctx: RankContext) -> bool:
    return ctx.distributed and dist.is_initialized()


def broadcast_from_main(ctx: RankContext, obj: T | None) -> T:
    """Rank 0's `obj` on every rank (pickled through the process group); one process: `obj`."""
    if not _grouped(ctx):
        return obj  # type: ignore[return-value]
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def gather_to_main(ctx: RankContext, obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others); one process: [obj]."""
    if not _grouped(ctx):
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_to_all(ctx: RankContext, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank; one process: [obj]."""
    if not _grouped(ctx):
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: RankContext) -> None:
    """Wait until every rank gets here (one process: return)."""
    if _grouped(ctx):
        dist.barrier()


# --------------------------------------------------------------------------- the split


def image_pixels(path: str | os.PathLike[str]) -> int:
    """Number of values (pixels x channels) of an image file, read from its header without decoding the
    pixels where the format allows (TIFF: tifffile's first series; NPY: numpy's header; PNG/JPEG/BMP:
    Pillow's lazy open, a dependency of matplotlib). A file whose header cannot be read weighs its size in
    bytes (it will fail or succeed later, on whichever rank gets it)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(p) as tif:
                return int(np.prod(tif.series[0].shape)) if tif.series else 0
        if suffix == ".npy":
            return int(np.prod(np.load(p, mmap_mode="r", allow_pickle=False).shape))
        # here, not at the top: only folders of PNG / JPEG / BMP need it
        from PIL import Image

        with Image.open(p) as im:
            return int(im.width * im.height * len(im.getbands()))
    except Exception:  # noqa: BLE001 - any unreadable header: the weight falls back to the file size
        try:
            return int(p.stat().st_size)
        except OSError:
            return 0


def balanced_shares(weights: Sequence[int], world_size: int) -> list[list[int]]:
    """Split items 0..len(weights)-1 into `world_size` disjoint shares of about equal total weight.

    Greedy longest-processing-time (module docstring): deterministic, complete, each share in increasing
    index order (the list's order). Returns one list of indices per rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i)):
        target = min(range(world_size), key=lambda r: (loads[r], r))
        shares[target].append(index)
        loads[target] += int(weights[index])
    return [sorted(share) for share in shares]


def shard_files(files: Sequence[Path], world_size: int) -> list[list[Path]]:
    """`balanced_shares` of a file list weighted by `image_pixels`: one list of files per rank."""
    shares = balanced_shares([image_pixels(p) for p in files], world_size)
    return [[files[i] for i in share] for share in shares]


# --------------------------------------------------------------------------- one progress bar


class RankProgress:
    """A progress count over all ranks, drawn as ONE tqdm bar by rank 0.

    Every rank calls `update()` per item; the count lives in the launcher's TCP store (MASTER_ADDR /
    MASTER_PORT, reached as a client) and rank 0 redraws the bar from it twice a second. `n` is this rank's
    own count. One process: a plain tqdm bar. `write` prints a line without breaking the bar on any rank.
    """

    _made = 0  # bars with a shared counter made by this process

    def __init__(self, ctx: RankContext, total: int, **tqdm_kwargs: Any) -> None:
        self.ctx = ctx
        self.n = 0
        self.bar = tqdm(total=total, disable=not ctx.is_main or not total, file=sys.stderr, **tqdm_kwargs)
        self._store: dist.Store | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key = ""
        if _grouped(ctx) and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            try:
                self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                            is_master=False, timeout=datetime.timedelta(seconds=60))
            except (RuntimeError, ValueError, OSError) as exc:  # no store to reach: rank 0 counts its own share
                self.write(f"rank {ctx.rank}: no shared progress counter ({exc}); the bar shows rank 0's share")
        if self._store is not None:
            # one key per bar (every rank makes its bars in the same order) and per launch attempt: a restarted
            # elastic group starts from zero
            RankProgress._made += 1
            self._key = f"cpsam-progress/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{RankProgress._made}"
            if ctx.is_main and total:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_S):
            self._redraw()

    def _redraw(self) -> None:
        assert self._store is not None
        with contextlib.suppress(Exception):  # a store gone at shutdown only stops the redraws
            count = int(self._store.add(self._key, 0))
            if count != self.bar.n:
                self.bar.n = count
                self.bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._store is None:
            self.bar.update(n)
        else:
            self._store.add(self._key, n)

    def write(self, message: str, file: Any = None) -> None:
        self.bar.write(message, file=file or sys.stderr)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._redraw()
        self._store = None  # the store client is released now, while the interpreter is whole, not at its exit
        self.bar.close()
