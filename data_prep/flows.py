"""Fill the flow cache (flows/NAME.tif, float32 (2, H, W) [dY, dX]) of a canonical dataset.

The flow algebra lives in `cpsam.dynamics` (one implementation for the whole project); this module
only decides which files are missing and hands them to `cpsam.dynamics.write_flow_cache`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpsam.dynamics import write_flow_cache
from data_prep.canonical import CanonicalDataset

MIN_FILES_PER_WORKER = 32


def fill_flow_cache(
    root: str | os.PathLike[str], *, workers: int = 1, force: bool = False, progress: bool = True
) -> int:
    """Compute flows for every example of `root` that has none yet (all with `force`).

    Returns the number of flow files written. Each file is written atomically by cpsam.dynamics.
    `workers` is capped at one process per MIN_FILES_PER_WORKER files.
    """
    ds = CanonicalDataset(root)
    todo = [i for i in range(len(ds)) if force or not ds.has_flows(i)]
    if not todo:
        return 0
    Path(root, "flows").mkdir(parents=True, exist_ok=True)
    # a worker process costs ~15-30 s to start (it imports torch and compiles the numba kernels), so
    # small jobs run in this process: at most one worker per MIN_FILES_PER_WORKER files
    workers = max(1, min(workers, len(todo) // MIN_FILES_PER_WORKER))
    write_flow_cache(
        [ds.mask_path(i) for i in todo], [ds.flow_path(i) for i in todo], workers=workers, progress=progress
    )
    return len(todo)
