"""Fit a classic Cellpose size model (style -> diameter ridge regression), as cellpose 3's `train_size`.

For `n_epochs` passes over the training images, every image is cut into one random crop x crop
view (rotation, flip and a scale drawn uniformly from [0.5, 1.5]: cellpose's
`random_rotate_and_resize` with scale_range 1 and no rescaling); the network (eval mode) gives the
crop's style vector, and the target is log(median diameter of the image) - log(diam_mean) +
log(scale). With X the centered styles and y the centered targets,

    A = (X X^T + l2 I)^-1 X y,   smean = mean style,   ymean = mean target,

and `cpsam.size.SizeModel` predicts exp(A . (style - smean) + log(diam_mean) + ymean).
The crops come from the project's one augmentation code (`train.augment.draw_geometry` / `warp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cpsam.size import SizeModel, median_diameter
from train.augment import (
    AugmentConfig,
    apply_bounds,
    draw_geometry,
    percentile_bounds_per_channel,
    to_model_channels,
    warp,
)

SIZE_AUGMENT = AugmentConfig(scale_mode="range", scale_range=1.0, rescale_to_diam_mean=False, intensity=False)


@dataclass
class SizeFitReport:
    """What the fit saw: the fitted model, the train correlation of predicted and true log diameters,
    and the number of (crop, style) pairs."""

    size_model: SizeModel
    train_correlation: float
    n_samples: int


def fit_size_model(
    model: nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    n_epochs: int = 10,
    crop: int = 512,
    l2_regularization: float = 1.0,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SizeFitReport:
    """Fit the size model of a CPnet-like `model` (returns (output, style, ...), has `diam_mean`).

    images: (C, H, W) arrays in the model's input channels (any dtype; normalized per image, 1st-99th
    percentile, here); labels: matching (H, W) instance labels. Images without objects are skipped.
    Raises ValueError when no image has objects.
    """
    diam_mean = float(model.diam_mean.detach().float().cpu()[0])
    keep = [(np.asarray(im), np.asarray(lab)) for im, lab in zip(images, labels, strict=True) if lab.max() > 0]
    if not keep:
        raise ValueError("fit_size_model: no training image has objects")
    n_channels = int(model.in_channels)
    prepared = []
    for image, lab in keep:
        image = image[None] if image.ndim == 2 else image
        lo, hi = percentile_bounds_per_channel(image)
        prepared.append((to_model_channels(apply_bounds(image, lo, hi), n_channels), lab, median_diameter(lab)))
    rng = np.random.default_rng(seed)
    styles, targets = [], []
    was_training = model.training
    model.eval()
    zeros: dict[tuple[int, int], np.ndarray] = {}
    bar = tqdm(total=n_epochs * len(prepared), desc="size model", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for _ in range(n_epochs):
                for start in range(0, len(prepared), batch_size):
                    crops, logs = [], []
                    for image, lab, diam in prepared[start : start + batch_size]:
                        hw = lab.shape
                        geometry = draw_geometry(rng, hw, crop, SIZE_AUGMENT)
                        flows = zeros.setdefault(hw, np.zeros((2, *hw), np.float32))  # targets are not used
                        crops.append(warp(image, lab, flows, geometry, crop).image)
                        logs.append(np.log(diam) - np.log(diam_mean) + np.log(geometry.scale))
                    x = torch.from_numpy(np.stack(crops)).to(device)
                    styles.append(model(x)[1].float().cpu().numpy())
                    targets.extend(logs)
                    bar.update(len(crops))
    finally:
        bar.close()
        model.train(was_training)
    style_matrix = np.concatenate(styles).astype(np.float64)
    y_all = np.asarray(targets, np.float64)
    smean = style_matrix.mean(axis=0)
    x = (style_matrix - smean).T
    ymean = float(y_all.mean())
    y = y_all - ymean
    a = np.linalg.solve(x @ x.T + l2_regularization * np.eye(x.shape[0]), x @ y)
    predicted = a @ x
    corr = float(np.corrcoef(y, predicted)[0, 1]) if y.std() > 0 else float("nan")
    return SizeFitReport(SizeModel(A=a, smean=smean, diam_mean=diam_mean, ymean=ymean), corr, len(y))
