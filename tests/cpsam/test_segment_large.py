"""An 8192 x 8192 image runs tile by tile with bounded memory (numpy allocations measured)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from cpsam.models import create_model
from cpsam.segment import Segmenter


@pytest.mark.slow
def test_8192_image_is_tiled_with_bounded_memory() -> None:
    torch.manual_seed(0)
    model = create_model("cpnet", nbase=[1, 32]).eval()  # the smallest student: fast on CPU
    rng = np.random.default_rng(0)
    side = 8192
    image = rng.integers(0, 4000, size=(side, side), dtype=np.uint16)
    seg = Segmenter(model, device="cpu", batch_size=32)
    tracemalloc.start()
    res = seg.segment([image], compute_masks=False)[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.dP.shape == (2, side, side) and np.isfinite(res.dP).all()
    # numpy memory beyond the uint16 input: normalized input (4 B/px) + 3-channel accumulator (12 B/px),
    # whose crop is the returned flows.
    # A whole-image pass (or cellpose's stack of all 1369 tiles and their outputs) needs far more.
    bytes_per_pixel = peak / side**2
    print(f"peak numpy memory {peak / 2**30:.2f} GiB = {bytes_per_pixel:.1f} bytes/pixel")
    assert bytes_per_pixel <= 18
