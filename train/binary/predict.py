"""Inference of the binary family: whole image -> class probabilities (tiled) -> cell masks.

    probs = predict_probabilities(net, image, code)          # (K, H, W) float32, sums to 1 over K
    masks = probability_to_masks(cell_probability(probs))   # connected components, uint16/uint32 labels

As in training: every channel is scaled by its 1st/99th percentiles over the whole image
(`train.augment.normalize_image`), then the run's loading code makes the network input with its inference rule
(no random draw). A side shorter than the tile gets one tile of its length (rounded up to 32 px, zero-padded); a
longer one overlapping tiles (512 px by default, `cpsam.transforms.tile_starts`, 10 % overlap), whose softmax
outputs are blended with the sigmoid taper of Cellpose inference (`cpsam.transforms.taper_1d`): no seams.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpsam import transforms
from cpsam.cli_types import INFERENCE_TILE_STRIDE, TILE_SIZE_LIMITS, size_problem
from cpsam.models.loading import CheckpointError, load_model, read_checkpoint
from cpsam.segment import check_finite  # the NaN/Inf rule of `cpsam segment`
from data_prep.labels import split_components
from train.augment import normalize_image, to_model_channels
from train.binary.loading_codes import LoadingCode, parse_loading_code

TILE_OVERLAP = 0.1
INFERENCE_TILE = 512  # px; larger tiles than training's waste less on overlaps (the net is fully convolutional)
ENCODER_STRIDE = INFERENCE_TILE_STRIDE  # the encoder halves the input five times
CPU_TILE_BATCH = 2  # CPU convolutions gain nothing from larger batches (see cpsam.segment.CPU_SUB_BATCH)


def network_input(image: np.ndarray, code: LoadingCode) -> np.ndarray:
    """(H, W) or (C, H, W) raw image -> (code.n_outputs, H, W) float32 network input (normalize, then the code's
    inference rule). Channels the code reads that the image lacks are blank."""
    chw = image[None] if image.ndim == 2 else image
    needed = max(code.n_sources, chw.shape[0] if code.uses_all_channels else 0, 1)
    chw = to_model_channels(chw, max(needed, chw.shape[0]))
    return code.apply(normalize_image(chw))[0]


def _tile_side(length: int, tile: int) -> int:
    """The tile side along an axis: `tile`, or the axis rounded up to a multiple of 32 when that is shorter."""
    return min(int(tile), -(-int(length) // ENCODER_STRIDE) * ENCODER_STRIDE)


@torch.inference_mode()
def predict_probabilities(net: nn.Module, image: np.ndarray, code: LoadingCode, *, tile: int | None = None,
                          batch_size: int = 8, device: torch.device | str | None = None) -> np.ndarray:
    """Class probabilities of a whole image: (K, H, W) float32 in [0, 1], summing to 1 over the K classes.

    image: (H, W) or (C, H, W) raw pixels (any dtype). code: the run's loading code. tile: tile side in px
    (default INFERENCE_TILE; an axis shorter than it gets one tile of its length rounded up to 32 px, so small
    images cost no padding to a full tile). The net is put in eval mode (BatchNorm running statistics) and left so.
    Raises cpsam.segment.ImageError (a ValueError) for NaN/Inf pixels and ValueError for a tile outside
    `cpsam.cli_types.inference_tile`'s limits (a multiple of 32 px, 32 .. 4096).
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval()
    image = np.asarray(image)
    check_finite(image)
    x = network_input(image, code)
    _, height, width = x.shape
    if tile is not None and (problem := size_problem(int(tile), ENCODER_STRIDE, TILE_SIZE_LIMITS[1],
                                                    ENCODER_STRIDE)) is not None:
        raise ValueError(f"tile {problem}")
    th, tw = _tile_side(height, tile or INFERENCE_TILE), _tile_side(width, tile or INFERENCE_TILE)
    ly, lx = max(height, th), max(width, tw)
    padded = np.zeros((x.shape[0], ly, lx), np.float32)
    padded[:, :height, :width] = x
    ystarts = transforms.tile_starts(ly, th, TILE_OVERLAP)
    xstarts = transforms.tile_starts(lx, tw, TILE_OVERLAP)
    taper = torch.from_numpy(np.outer(transforms.taper_1d(th), transforms.taper_1d(tw)).astype(np.float32))
    accum: np.ndarray | None = None
    corners = [(int(y0), int(x0)) for y0 in ystarts for x0 in xstarts]
    step = CPU_TILE_BATCH if device.type == "cpu" else batch_size
    for k in range(0, len(corners), step):
        group = corners[k:k + step]
        batch = torch.from_numpy(np.stack([padded[:, y0:y0 + th, x0:x0 + tw] for y0, x0 in group]))
        probs = torch.softmax(net(batch.to(device))[0].float(), dim=1).cpu() * taper
        if accum is None:
            accum = np.zeros((probs.shape[1], ly, lx), np.float32)
        for (y0, x0), p in zip(group, probs.numpy(), strict=True):
            accum[:, y0:y0 + th, x0:x0 + tw] += p
    assert accum is not None
    accum /= transforms.blend_weight_1d(ly, ystarts, th)[None, :, None].astype(np.float32)
    accum /= transforms.blend_weight_1d(lx, xstarts, tw)[None, None, :].astype(np.float32)
    return np.ascontiguousarray(accum[:, :height, :width])


def cell_probability(probs: np.ndarray) -> np.ndarray:
    """(K, H, W) class probabilities -> (H, W) float32 probability of any cell class (1 - background)."""
    return np.clip(1.0 - probs[0], 0.0, 1.0).astype(np.float32)


def probability_to_masks(cell_prob: np.ndarray, threshold: float = 0.5, min_size: int = 0) -> np.ndarray:
    """(H, W) cell probability -> instance labels: connected components (4-neighbourhood) of prob > threshold,
    components under `min_size` px dropped; uint16 (uint32 above 65535 components), 0 = background."""
    return split_components(np.asarray(cell_prob) > threshold, min_size=min_size)


def load_binary_model(path: str | os.PathLike[str],
                      device: str | torch.device = "cpu") -> tuple[nn.Module, LoadingCode]:
    """A trained binary model (RUN/model.pt or a run folder) and the loading code it was trained with.

    Raises cpsam.models.CheckpointError (a ValueError naming the file) for an unreadable file or one that is not a
    binary-family checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    model = load_model(p, device)
    if not hasattr(model, "num_classes") or not hasattr(model, "encoder_name"):
        raise CheckpointError(p, f"not a binary-family model (found {type(model).__name__}); train one with "
                                 "`cpsam binary train`")
    config: dict[str, Any] = read_checkpoint(p).get("config") or {}
    text = str((config.get("binary") or {}).get("loading_code", ""))
    try:
        code = parse_loading_code(text, int(model.in_channels))
    except ValueError as exc:
        raise CheckpointError(p, f"its loading code does not fit the model: {exc}") from exc
    return model, code
