"""Validation by AP during training: each rank segments its share of whole validation images.

Per image the masks come from `cpsam.segment.Segmenter` (the inference path users run) and are
scored with `cpsam.metrics.score_image`. Each rank sums, per validation dataset and IoU threshold,
the per-image AP and error rate, the image count and TP/FP/FN; the sums are added over ranks
(one all-reduce), so every rank gets the same numbers whatever the number of processes.

Reported: `val_ap50` / `val_ap75` / `val_ap90` = mean per-image AP (the paper's convention,
AP = TP / (TP + FP + FN) per image, then averaged), `val_err50` = mean per-image error rate at
IoU 0.5, `val_ap50_pooled` = TP / (TP + FP + FN) of the summed counts, and the same per dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from cpsam.metrics import score_image
from cpsam.segment import Segmenter, rules_for
from data_prep.canonical import CanonicalDataset
from train.augment import to_model_channels

THRESHOLDS = (0.5, 0.75, 0.9)
# per (dataset, threshold): sum AP, sum error rate, images, TP, FP, FN
_FIELDS = 6


@dataclass(frozen=True)
class ValImage:
    """One validation image: dataset index (into data.val), the folder view and row index."""

    dataset_index: int
    data: CanonicalDataset
    index: int


def list_val_images(roots: Sequence[str], split: str | None, max_images: int | None = None) -> list[ValImage]:
    """All validation images of `roots` (rows of `split`; None = all), in a fixed order, capped per dataset."""
    out: list[ValImage] = []
    for d, root in enumerate(roots):
        ds = CanonicalDataset(root, split=split)
        n = len(ds) if max_images is None else min(len(ds), int(max_images))
        out += [ValImage(d, ds, i) for i in range(n)]
    return out


def validate(
    model: nn.Module,
    images: Sequence[ValImage],
    n_datasets: int,
    rank: int,
    world_size: int,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    *,
    channels: int,
    use_true_diameter: bool,
    batch_size: int = 8,
    niter: int | None = None,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    mask_rules: str = "",
    device: torch.device | None = None,
    dataset_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Segment images[rank::world_size], score them, sum over ranks; returns the metrics dict.

    `model` is the unwrapped network; it is put in eval mode here and left in eval mode (the caller
    switches back to train). `channels` = input channels the model was trained on: images are fed
    their first `channels` channels, zero-padded, as in training. `mask_rules`: "cp3" / "cp4" flow -> mask
    rules instead of the model's own ("").
    """
    sums = torch.zeros(n_datasets, len(THRESHOLDS), _FIELDS, dtype=torch.float64)
    rules = rules_for(model)
    if mask_rules:
        rules = dataclasses.replace(rules, mask_rules=mask_rules)
    segmenter = Segmenter(model, device=device, batch_size=batch_size, bf16=False, rules=rules)
    # the images below are already in the model's input channels: a channel choice recorded in the checkpoint a
    # run started from (a distilled student's [SEG, NUC]) must not be applied to them a second time
    segmenter.default_channels = None
    mine = list(images[rank::world_size])
    bar = tqdm(mine, desc="validate", disable=not (progress and rank == 0), leave=False, dynamic_ncols=True)
    with torch.no_grad():
        for item in bar:
            chans = to_model_channels(item.data.image(item.index), channels)  # as in training
            diameter = item.data[item.index].median_diameter if use_true_diameter else None
            result = segmenter.segment(
                [chans], diameter=diameter, channel_axis=0, niter=niter,
                flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
            )[0]
            scores = score_image(item.data.mask(item.index), result.masks, thresholds=THRESHOLDS)
            for t, thr in enumerate(THRESHOLDS):
                s = scores.at(thr)
                sums[item.dataset_index, t] += torch.tensor(
                    [s.ap, s.error_rate, 1.0, s.tp, s.fp, s.fn], dtype=torch.float64
                )
    sums = reduce_sum(sums)
    return summarize(sums, dataset_names)


def summarize(sums: torch.Tensor, dataset_names: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics from the summed (datasets, thresholds, 6) tensor: overall means and per-dataset AP@0.5."""
    total = sums.sum(0)
    out: dict[str, float] = {}
    n = float(total[0, 2])
    if n == 0:
        return out
    for t, thr in enumerate(THRESHOLDS):
        tag = f"{round(thr * 100):d}"
        out[f"val_ap{tag}"] = float(total[t, 0]) / n
        tp, fp, fn = (float(v) for v in total[t, 3:6])
        out[f"val_ap{tag}_pooled"] = tp / max(tp + fp + fn, 1.0)
    out["val_err50"] = float(total[0, 1]) / n
    out["val_images"] = n
    for d in range(sums.shape[0]):
        m = float(sums[d, 0, 2])
        if m and dataset_names is not None:
            out[f"val_ap50/{dataset_names[d]}"] = float(sums[d, 0, 0]) / m
    return out
