"""Host-memory behaviour of a training process: glibc's mmap threshold, set per phase of the step.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes (128 KiB at start) with its own mmap
and unmaps it on free. But the threshold is dynamic: freeing such a chunk raises it to the chunk's size
(up to 32 MiB), so after the first training step the activations of a ViT (4-16 MiB tensors) come from
the heap, and freed heap memory mostly stays resident: the activations of the forward pass and the gradients
of the backward pass then occupy different memory, and the process peaks at their sum.

What the loop does on a CPU device (`host_mmap_threshold_mb`; `auto`: 1 MiB for models of AUTO_MIN_PARAMETERS
or more, off below): during the forward pass, every
allocation of at least that size is mmapped (`forward_allocations`), so the activations saved for backward return
to the OS as the backward pass frees them; during the backward pass the threshold is 32 MiB (the heap, no page
faults for the many short-lived gradient temporaries). With the optimizer step fused into the backward pass
(train.optim_in_backward: gradients never accumulate) the step then peaks at the activations' own peak.
In the first step the 1 MiB threshold stays on through the backward pass, because AdamW creates its state
there: state left in the heap among temporaries pins them. Measured on a CP-SAM ViT-L step on 2 cores (batch 1,
256 px; benchmarks/bench_train.py and README): peak RSS 7.56 GB at 8.8 s per step with glibc's default and a separate
optimizer step, 6.32 GB at 10.9 s with the phases and the fused step (separate runs; probes of our side alone gave
9.8 vs 9.9 s); the forward pass pays for its page faults (3.8 vs 2.7 s). A fixed 1 MiB threshold for the whole
step reaches the same memory but costs about 20 % more time in probes (2.5 M page faults per step).
Why auto leaves small models alone: a CPnet's activations are a few MiB each and its whole step peaks near 1.5 GB,
so the page faults buy little: 20 steps of tiny_cpu.yaml (CPnet [3, 16, 32, 64], batch 8 of 128 px, 2 cores) made
9.3 M page faults and 29.7 s of kernel time with the 1 MiB threshold, 1.4 M and 5.4 s with auto, for a peak RSS of
1.38 vs 1.53 GB (`/usr/bin/time -v`, separate runs, 2026-12-03).
Why not jemalloc/tcmalloc via LD_PRELOAD: they are not a pip dependency and must be set before the process
starts; this works from inside `cpsam train`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
HEAP_THRESHOLD_MB = 32.0  # glibc's largest threshold (64-bit): outside the forward pass, tensors come from the heap
AUTO_THRESHOLD_MB = 1.0  # what `auto` uses for a large model (CP-SAM ViT-B/L)
AUTO_MIN_PARAMETERS = 50_000_000  # `auto` mmaps the forward pass's activations from this many parameters on


def parse_threshold(setting: str | float) -> float | None:
    """`host_mmap_threshold_mb` as MiB (float in [0, 32]), or None for "auto"; ValueError for anything else."""
    text = str(setting).strip().lower()
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"host_mmap_threshold_mb must be auto or a number of MiB in [0, 32], got {setting!r}") \
            from None
    if not 0 <= value <= HEAP_THRESHOLD_MB:
        raise ValueError(f"host_mmap_threshold_mb must be in [0, 32] (glibc's maximum), got {setting!r}")
    return value


def forward_threshold_mb(setting: str | float, n_parameters: int) -> float:
    """The forward pass's mmap threshold (MiB; 0 = leave glibc alone) for a model of `n_parameters`:
    the number given, or for "auto" AUTO_THRESHOLD_MB from AUTO_MIN_PARAMETERS parameters on, else 0."""
    value = parse_threshold(setting)
    if value is not None:
        return value
    return AUTO_THRESHOLD_MB if n_parameters >= AUTO_MIN_PARAMETERS else 0.0


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's mallopt, looked up once (the loop sets the threshold twice per step; find_library costs ~2 ms)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def set_mmap_threshold(megabytes: float) -> bool:
    """Make glibc mmap (and return to the OS on free) every allocation of at least `megabytes` MiB, with the
    dynamic threshold adjustment off. Returns True when set; False (nothing changed) for megabytes <= 0, on a
    system without glibc, or when glibc refuses the value (its maximum is 32 MiB on 64-bit systems)."""
    if megabytes <= 0 or not sys.platform.startswith("linux"):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(megabytes * 2**20)))


@contextmanager
def forward_allocations(megabytes: float, keep_after: bool = False) -> Iterator[None]:
    """Inside the block (a forward pass), allocations of at least `megabytes` MiB are mmapped; after it, those
    below HEAP_THRESHOLD_MB come from the heap again, unless `keep_after` (the first step: the optimizer state
    created in its backward pass must not land in the heap). `megabytes <= 0` (or no glibc): nothing changes."""
    active = set_mmap_threshold(megabytes)
    try:
        yield
    finally:
        if active and not keep_after:
            set_mmap_threshold(HEAP_THRESHOLD_MB)
