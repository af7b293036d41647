"""Host-memory behaviour of a training process: glibc's mmap threshold.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes (128 KiB at start) with its own mmap
and unmaps it on free. But the threshold is dynamic: freeing such a chunk raises it to the chunk's size
(up to 32 MiB), so after the first training step the activations of a ViT (4-16 MiB tensors) come from
the heap, and freed heap memory mostly stays resident. Measured on one CP-SAM ViT-L training step on a
CPU (batch 1, 256 px): the process idles at 6.2 GiB between steps where its live tensors (weights and
AdamW state) are 4.2 GiB, and peaks at 7.2 GiB; with a fixed 1 MiB threshold it idles at 4.2 GiB and
peaks at 6.2 GiB. Setting the threshold once (mallopt) also switches the dynamic adjustment off. The
price is a page fault per 4 KiB the first time each new large tensor is touched (counted by
eval/bench_train.py). Why not jemalloc/tcmalloc via LD_PRELOAD: they are not a pip dependency and must be
set before the process starts; this works from inside `cpsam train`. Off by default (`host_mmap_threshold_mb=0`):
the page faults cost a ViT-L step 22 % of its time (25.9 vs 21.3 s), which a GPU user never needs to pay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(megabytes: float) -> bool:
    """Make glibc mmap (and return to the OS on free) every allocation of at least `megabytes` MiB, with the
    dynamic threshold adjustment off. Returns True when set; False (nothing changed) for megabytes <= 0, on a
    system without glibc, or when glibc refuses the value (its maximum is 32 MiB on 64-bit systems)."""
    if megabytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(megabytes * 2**20)))
