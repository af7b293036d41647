"""The binary family's objectives for the one training loop: "binary" (cell / background with class weights) and
"binary_distill" (a student on a frozen teacher's soft targets). Registered with `train.objective` on import.

    cfg = load_config(None, ["objective=binary", "model.init=RUN/init.pt", "data.train=[RUN/data]", ...])
    train.loop.train(cfg)

Samples come from the one pipeline (`train.data.TrainDataset` + `train.augment`): the augmented crop keeps all the
source channels the loading code reads, then the code makes the network input with the sample's own generator
(`train.binary.loading_codes.loading_generator`); the target is the crop's instance masks > 0 (class 1 = cell). The flow
targets of the Cellpose pipeline are not needed: a zero flow field (a broadcast view, no memory) stands in for the
flow cache, so no flows are computed.

binary: loss = cross-entropy with `binary.class_weights` [background, cell] (PyTorch's weighted mean,
`train.loss.class_loss`); the batch's foreground Dice and Jaccard are logged beside it.
binary_distill: loss = T^2 KL(softmax(teacher / T) || softmax(student / T)) per pixel (`train.loss.soft_target_loss`)
with the teacher run online on each micro-batch (`prepare_batch`); masks are never read by the loss; Dice and
Jaccard are logged against the teacher's hard prediction.
Validation (both): foreground IoU, Dice, precision and recall of whole `data.val` images (tiled inference,
`train.binary.predict`), pixel counts summed over images and ranks; the best checkpoint by `val_iou`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from train.binary.loading_codes import LoadingCode, loading_generator, parse_loading_code
from train.binary.predict import cell_probability, load_binary_model, predict_probabilities
from train.config import ConfigError, TrainConfig
from train.data import PipelineSpec, SampleKey, TrainDataset
from train.loss import class_loss, dice_jaccard, foreground_counts, soft_target_loss
from train.objective import Objective, register_objective
from train.sampler import MultiDatasetSampler

METRICS = ("val_iou", "val_dice", "val_precision", "val_recall")


class BinaryDataset(TrainDataset):
    """Training samples of the binary family (see the module docstring).

    `ds[key]` returns: image float32 (code.n_outputs, T, T) the network input; target int64 (T, T) 0 = background,
    1 = cell; valid float32 (T, T); masks int32 (T, T); and the keys of `TrainDataset` samples.
    """

    def __init__(self, sampler: MultiDatasetSampler, spec: PipelineSpec, seed: int, cache_mb: int,
                 code: LoadingCode) -> None:
        rows = sampler.used_rows()
        widest = max((r.channels for r in rows), default=1)
        sources = max(code.n_sources, widest if code.uses_all_channels else 0, 1)
        # native scale and no flow work: flows are warped from the zero stand-in, never recomputed
        augment = replace(spec.augment, target_mode="warp")
        super().__init__(sampler, replace(spec, channels=sources, augment=augment), seed, cache_mb)
        self.code = code

    def example_arrays(self, dataset_index: int, example_index: int) -> dict[str, Any]:
        """The base example with a zero (2, H, W) flow field (a read-only broadcast view) in place of the cache."""
        ex = super().example_arrays(dataset_index, example_index)
        ex["flows"] = np.broadcast_to(np.zeros((), np.float32), (2, *np.shape(ex["masks"])))
        return ex

    def sample_with_code(self, key: SampleKey) -> tuple[dict[str, Tensor], list[str]]:
        """The sample of `key` and what each input channel received from the loading code (e.g. ["2", "x"])."""
        key = SampleKey(*key)
        sample = super().make_sample(key)
        image, told = self.code.apply(sample["image"].numpy(), loading_generator(self.seed, key.epoch, key.position))
        sample["image"] = torch.from_numpy(image)
        sample["target"] = (sample["masks"] > 0).long()
        return sample, told

    def make_sample(self, key: SampleKey) -> dict[str, Tensor]:
        """See the class docstring."""
        return self.sample_with_code(key)[0]


def _class_weights(cfg: TrainConfig) -> torch.Tensor:
    weights = [float(w) for w in cfg.binary.class_weights]
    if cfg.binary.num_classes != 2:
        raise ConfigError(f"binary.num_classes must be 2 (background, cell), got {cfg.binary.num_classes}")
    if len(weights) != 2 or min(weights) <= 0:
        raise ConfigError(f"binary.class_weights must be two positive weights [background, cell], got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


class BinaryObjective(Objective):
    """Cell / background segmentation: weighted cross-entropy; validation by foreground IoU (module docstring)."""

    name = "binary"
    term_names: tuple[str, ...] = ("loss_ce", "dice", "jaccard")
    best_metric = "val_iou"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.class_weights = _class_weights(cfg)
        self.code_text = cfg.binary.loading_code

    def loading_code(self, n_channels: int) -> LoadingCode:
        """The run's loading code for a net of `n_channels` inputs; ConfigError when they do not fit."""
        try:
            return parse_loading_code(self.code_text, n_channels)
        except ValueError as exc:
            raise ConfigError(f"binary.loading_code: {exc}") from exc

    def dataset(self, sampler, spec, seed: int, cache_mb: int) -> BinaryDataset:
        """BinaryDataset over the sampler's examples; `spec.channels` is the network's input channels."""
        return BinaryDataset(sampler, spec, seed, cache_mb, self.loading_code(spec.channels))

    def hard_target(self, batch: dict[str, Tensor]) -> Tensor:
        """The class map (B, T, T) int64 the logged Dice / Jaccard compare with (ground truth here)."""
        return batch["target"]

    def loss(self, net: nn.Module, aux: nn.ModuleDict, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted cross-entropy of net(image)[0] (B, 2, T, T) against target, plus the batch's Dice / Jaccard."""
        logits = net(batch["image"])[0]
        ce = class_loss(logits, batch["target"], self.class_weights.to(logits.device), batch.get("valid"))
        dice, jaccard = dice_jaccard(foreground_counts(logits, self.hard_target(batch), batch.get("valid")))
        return ce, {"loss_ce": ce, "dice": dice, "jaccard": jaccard}

    def val_columns(self, dataset_names: Sequence[str]) -> list[str]:
        """metrics.csv validation columns: pooled foreground metrics, image count, IoU per dataset."""
        return [*METRICS, "val_images", *(f"val_iou/{n}" for n in dataset_names)]

    def validate(self, net: nn.Module, images: Sequence[Any], n_datasets: int, rank: int, world: int,
                 reduce_sum: Callable[[Tensor], Tensor], **kwargs: Any) -> dict[str, float]:
        """Foreground metrics of `net` on whole validation images (`validate_binary`)."""
        code = self.loading_code(int(kwargs.get("channels") or net.in_channels))
        return validate_binary(net, images, n_datasets, rank, world, reduce_sum, code=code,
                               batch_size=int(kwargs.get("batch_size", 8)), device=kwargs.get("device"),
                               dataset_names=kwargs.get("dataset_names"), progress=bool(kwargs.get("progress", True)))


class BinaryDistillObjective(BinaryObjective):
    """A student trained on the soft targets of a frozen binary teacher (`binary.teacher`, `binary.temperature`)."""

    name = "binary_distill"
    term_names = ("loss_kd", "dice", "jaccard")

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if not cfg.binary.teacher:
            raise ConfigError("objective binary_distill needs binary.teacher (a binary model.pt or run folder)")
        if not cfg.binary.temperature > 0:
            raise ConfigError(f"binary.temperature must be > 0, got {cfg.binary.temperature}")
        try:
            teacher, _ = load_binary_model(cfg.binary.teacher)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"binary.teacher: {exc}") from exc
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.temperature = float(cfg.binary.temperature)

    def prepare_batch(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Add `soft_target` (B, K, T, T) = softmax(teacher logits / T) and `teacher_class` (B, T, T) int64."""
        image = batch["image"]
        if image.shape[1] != self.teacher.in_channels:
            raise ConfigError(f"the teacher takes {self.teacher.in_channels} input channels, the student's batch has "
                              f"{image.shape[1]}: use the teacher's loading code")
        self.teacher.to(device)
        logits = self.teacher(image)[0].float()
        batch["soft_target"] = torch.softmax(logits / self.temperature, dim=1)
        batch["teacher_class"] = logits.argmax(dim=1)
        return batch

    def hard_target(self, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's hard prediction (the run has no ground truth)."""
        return batch["teacher_class"]

    def loss(self, net: nn.Module, aux: nn.ModuleDict, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """T^2 KL to the teacher's soft targets, plus Dice / Jaccard against the teacher's hard prediction."""
        logits = net(batch["image"])[0]
        kd = soft_target_loss(logits, batch["soft_target"], self.temperature, batch.get("valid"))
        dice, jaccard = dice_jaccard(foreground_counts(logits, self.hard_target(batch), batch.get("valid")))
        return kd, {"loss_kd": kd, "dice": dice, "jaccard": jaccard}


def summarize_counts(sums: Tensor, dataset_names: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics from summed counts (datasets, 4) [TP, FP, FN, images]: pooled IoU, Dice, precision, recall, image
    count, and IoU per dataset (`val_iou/NAME`). Empty when no image was scored."""
    total = sums.sum(0).double()
    tp, fp, fn, n = (float(v) for v in total)
    if n == 0:
        return {}
    out = {"val_iou": tp / max(tp + fp + fn, 1.0), "val_dice": 2 * tp / max(2 * tp + fp + fn, 1.0),
           "val_precision": tp / max(tp + fp, 1.0), "val_recall": tp / max(tp + fn, 1.0), "val_images": n}
    for d in range(sums.shape[0]):
        dtp, dfp, dfn, dn = (float(v) for v in sums[d])
        if dn and dataset_names is not None:
            out[f"val_iou/{dataset_names[d]}"] = dtp / max(dtp + dfp + dfn, 1.0)
    return out


def image_counts(cell_prob: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None,
                 threshold: float = 0.5) -> np.ndarray:
    """float64 (3,) [TP, FP, FN] foreground pixel counts of prob > threshold against truth > 0 (ignore = left out)."""
    pred, gt = np.asarray(cell_prob) > threshold, np.asarray(truth) > 0
    if ignore is not None:
        pred, gt = pred & ~ignore, gt & ~ignore
    return np.array([np.count_nonzero(pred & gt), np.count_nonzero(pred & ~gt), np.count_nonzero(~pred & gt)],
                    np.float64)


def validate_binary(net: nn.Module, images: Sequence[Any], n_datasets: int, rank: int, world: int,
                    reduce_sum: Callable[[Tensor], Tensor], *, code: LoadingCode, batch_size: int = 8,
                    device: torch.device | None = None, dataset_names: Sequence[str] | None = None,
                    progress: bool = True) -> dict[str, float]:
    """Score images[rank::world] (train.validate.ValImage rows) by foreground pixels, sum over ranks.

    Returns `summarize_counts` of the all-reduced (n_datasets, 4) float64 [TP, FP, FN, images] sums; every rank
    gets the same numbers. The net is left in eval mode (the loop switches back).
    """
    sums = torch.zeros(n_datasets, 4, dtype=torch.float64)
    mine = list(images[rank::world])
    for item in tqdm(mine, desc="validate", disable=not (progress and rank == 0), leave=False):
        probs = predict_probabilities(net, item.data.image(item.index), code, batch_size=batch_size, device=device)
        counts = image_counts(cell_probability(probs), item.data.mask(item.index), item.data.ignore(item.index))
        sums[item.dataset_index] += torch.tensor([*counts, 1.0], dtype=torch.float64)
    return summarize_counts(reduce_sum(sums), dataset_names)


register_objective("binary", BinaryObjective)
register_objective("binary_distill", BinaryDistillObjective)
