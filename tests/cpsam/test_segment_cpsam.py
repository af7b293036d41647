"""CP-SAM end to end: our tiled flows equal cellpose 4.2.1.1's CellposeModel.eval with the same file.

The file is a randomly initialised ViT-L CP-SAM saved in the official layout (what
`cellpose.vit.CPSAM().state_dict()` writes); both pipelines run it in float32 on the CPU. The ViT-L
costs ~8-20 s per 256x256 tile on 2 CPUs, so the default test uses a 1-tile image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_shared_image

from cpsam.models.loading import load_model
from cpsam.segment import Segmenter, rules_for, tiles_per_image


@pytest.fixture(scope="module")
def official_random_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellpose.vit import CPSAM

    torch.manual_seed(0)
    net = CPSAM(dtype=torch.float32)
    path = tmp_path_factory.mktemp("cpsam") / "cpsam_random.pt"
    torch.save(net.state_dict(), path)
    return path


def compare(path: Path, image: np.ndarray, diameter: float | None, augment: bool = False) -> None:
    from cellpose.models import CellposeModel

    reference = CellposeModel(gpu=False, pretrained_model=str(path), use_bfloat16=False)
    _, flows, _ = reference.eval(image, diameter=diameter, augment=augment, compute_masks=False, batch_size=8)
    theirs = np.concatenate([flows[1], flows[2][None]])
    del reference

    model = load_model(path)
    seg = Segmenter(model, device="cpu", batch_size=8)
    assert rules_for(model).tile_size == 256 and rules_for(model).pad_to_tile
    res = seg.segment([image], diameter=diameter, augment=augment, compute_masks=False)[0]
    ours = np.concatenate([res.dP, res.cellprob[None]])
    assert ours.shape == theirs.shape == (3, *image.shape[:2])
    scale = float(np.abs(theirs).max())
    assert scale > 0.1
    assert float(np.abs(ours - theirs).max()) <= 1e-4 * scale


def test_cpsam_one_tile_equal_cellpose_eval(official_random_file: Path) -> None:
    """200x200 phase-contrast bacteria at diameter 25: resized to 240x240, padded to one 256 tile."""
    image = read_shared_image("bact_phase_neurips22", "neurips22_cell_00528")
    compare(official_random_file, image, 25.0)


@pytest.mark.slow
def test_cpsam_two_tiles_equal_cellpose_eval(official_random_file: Path) -> None:
    """869x51 bacteria channel at diameter 70: resized to 372x21, padded to 400x256 -> 2 tiles."""
    image = read_shared_image("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA")
    model_rules = rules_for(load_model(official_random_file))
    assert tiles_per_image(image.shape, 30 / 70, model_rules) == 2
    compare(official_random_file, image, 70.0)


@pytest.mark.slow
def test_cpsam_rgb_nine_tiles_with_augment_equal_cellpose_eval(official_random_file: Path) -> None:
    """512x512 RGB multiplexed tissue (one empty channel), no rescale: 3x3 tiles, flip augmentation 4x4."""
    image = read_shared_image("tissue_multiplex_neurips22", "neurips22_cell_00849")
    compare(official_random_file, image, None, augment=True)
