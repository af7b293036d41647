"""`Segmenter(timings=...)`: the per-stage wall-time collector that benchmarks.bench_students reads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_shared_image

from benchmarks.bench_students import STAGES as BENCH_STAGES
from benchmarks.bench_students import time_image
from cpsam.io import read_labels, write_tiff
from cpsam.models import resolve_model
from cpsam.segment import Segmenter

STAGES = {"normalize", "resize", "network", "tiles", "masks"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two OpenMP threads fighting other jobs for two cores make one small forward take seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_stage_timings_add_up_to_the_call_and_change_nothing(cyto0_file: Path) -> None:
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")[:120, :120]
    model = resolve_model(str(cyto0_file))
    timings: dict[str, float] = {}
    seg = Segmenter(model, batch_size=2, timings=timings)
    seg.segment([image], diameter=20.0)  # warm-up (numba loads its kernels inside "masks")
    plain = Segmenter(model, batch_size=2).segment([image], diameter=20.0)[0]
    timings.clear()
    start = time.perf_counter()
    timed = seg.segment([image], diameter=20.0)[0]
    total = time.perf_counter() - start
    assert set(timings) == STAGES and all(v > 0 for v in timings.values()), timings
    # the stages cover the call: what is left is Python glue between them
    assert 0.85 * total - 0.005 <= sum(timings.values()) <= total, (timings, total)
    np.testing.assert_array_equal(timed.masks, plain.masks)
    # oneDNN may pick other kernels between calls: flows agree to float rounding, as in test_segment.py
    np.testing.assert_allclose(timed.dP, plain.dP, rtol=1e-5, atol=1e-5)
    assert timed.masks.max() > 0
    # timings add up over calls; None switches the collector off
    seg.segment([image], diameter=20.0)
    assert sum(timings.values()) > 0.85 * total
    seg.timings = None
    seg.segment([image], diameter=20.0)


def test_bench_students_stages_cover_read_to_write(cyto0_file: Path, tmp_path: Path) -> None:
    """benchmarks.bench_students times read -> Segmenter stages -> write; their sum is the call's wall time."""
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")[:120, :120]
    src = write_tiff(tmp_path / "img_0.tif", image)
    seg = Segmenter(resolve_model(str(cyto0_file)), batch_size=2, timings={})
    time_image(seg, src, 20.0, tmp_path / "m.tif")  # warm-up
    start = time.perf_counter()
    parts, masks = time_image(seg, src, 20.0, tmp_path / "m.tif")
    total = time.perf_counter() - start
    assert tuple(parts) == BENCH_STAGES and set(BENCH_STAGES) == STAGES | {"read", "write"}
    assert all(v > 0 for v in parts.values()), parts
    assert 0.85 * total - 0.005 <= sum(parts.values()) <= total, (parts, total)
    np.testing.assert_array_equal(read_labels(tmp_path / "m.tif"), masks)
    assert masks.max() > 0
