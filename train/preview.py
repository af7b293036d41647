"""`cpsam train preview`: a grid of the augmented, degraded crops a config feeds the network.

For each of the first N samples of epoch 0 (exactly those training would see first, from the same
keys), two panels side by side: the network input (first three channels shown as RGB, values clipped
to [0, 1], so inversion, brightness and contrast changes are visible) with the crop's mask outlines,
and its flow target as the cellpose colour wheel. A caption names the dataset and marks degraded
samples.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from cpsam.cli_types import MAX_PREVIEW_SAMPLES, size_problem
from cpsam.io import flows_to_rgb, masks_to_outlines, write_png
from train.config import TrainConfig, dataset_entries
from train.data import PipelineSpec, SampleKey, TrainDataset
from train.model_init import build_model
from train.sampler import MultiDatasetSampler


def _input_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float network input -> uint8 (H, W, 3), clipped to [0, 1] (grey for one channel)."""
    planes = [np.clip(image[c], 0, 1) for c in range(min(3, image.shape[0]))]
    while len(planes) < 3:
        planes.append(planes[0] if image.shape[0] == 1 else np.zeros_like(planes[0]))
    return (np.stack(planes, axis=-1) * 255).astype(np.uint8)


def sample_panels(sample: dict, caption: str) -> np.ndarray:
    """uint8 (T + 18, 2T, 3): input with outlines | flow wheel, with a caption strip on top."""
    image = sample["image"].numpy()
    masks = sample["masks"].numpy()
    target = sample["target"].numpy()
    left = _input_rgb(image)
    left[masks_to_outlines(masks)] = (255, 60, 60)
    right = flows_to_rgb(target[1:3]) if np.any(target[1:3]) else np.zeros_like(left)
    panel = np.concatenate([left, right], axis=1)
    strip = np.zeros((18, panel.shape[1], 3), np.uint8)
    cv2.putText(strip, caption, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def write_preview(cfg: TrainConfig, n: int, out: str | os.PathLike[str]) -> Path:
    """Draw the first `n` samples of epoch 0 of `cfg` into a PNG grid at `out` (a .png name); returns the path.

    Raises ValueError for `n` outside 1 .. MAX_PREVIEW_SAMPLES or another suffix than .png."""
    problem = size_problem(int(n), 1, MAX_PREVIEW_SAMPLES)
    if problem is not None:
        raise ValueError(f"--n {problem}")
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--out {out}: must end in .png (a PNG image is written)")
    net = build_model(cfg.model)
    channels = int(cfg.data.channels or net.in_channels)
    tile = int(cfg.data.tile_size or net.tile_size)
    paths, weights = dataset_entries(cfg.data.train)
    if not paths:
        raise ValueError("data.train is empty: give at least one canonical dataset folder")
    samples = int(n)
    sampler = MultiDatasetSampler(paths, weights if weights is not None else cfg.data.weights,
                                  samples_per_epoch=samples, seed=cfg.seed, split=cfg.data.train_split,
                                  min_train_masks=cfg.data.min_train_masks)
    dataset = TrainDataset(sampler, PipelineSpec(tile, channels, cfg.augment, cfg.degrade), cfg.seed, cfg.data.cache_mb)
    panels = []
    for key in sampler.iter_positions():
        sample = dataset[SampleKey(0, key.position, key.dataset_index, key.example_index)]
        name = Path(sampler.roots[key.dataset_index]).name
        caption = f"{key.position}: {name[:18]} d={float(sample['diameter']):.0f}px"
        caption += " degraded" if bool(sample["degraded"]) else ""
        panels.append(sample_panels(sample, caption))
    cols = max(1, math.ceil(math.sqrt(len(panels) / 2)))
    rows = math.ceil(len(panels) / cols)
    h, w = panels[0].shape[:2]
    grid = np.full((rows * (h + 4), cols * (w + 4), 3), 40, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        grid[r * (h + 4): r * (h + 4) + h, c * (w + 4): c * (w + 4) + w] = p
    return write_png(out, grid)
