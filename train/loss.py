"""The Cellpose training losses: flow MSE + cell-probability BCE, and the optional class head's cross-entropy.

Layouts follow Cellpose (`cellpose.train._loss_fn_seg` / `_loss_fn_class`):

- network output (B, K + 3, H, W): K optional class logits first, then [dY, dX, cellprob logit]; flows are
  predicted at 5x unit length (`FLOW_SCALE`). With K = 0 the output is just [dY, dX, cellprob logit].
- segmentation target (B, 3, H, W): [cellprob in [0, 1], dY, dX] with unit flows; the cell probability is
  re-binarized at 0.5 here (augmentation warps it bilinearly).
- `valid` (B, H, W): nonzero / True = the pixel counts, 0 / False = ignored (a canonical dataset's `ignore/`
  pixels). Without it, every pixel counts and the result equals Cellpose's to float32 rounding.

All arithmetic is float32 whatever the output dtype (bf16 under autocast is upcast first).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FLOW_SCALE = 5.0  # the network predicts flows at 5x the unit-length targets
CELLPROB_THRESHOLD = 0.5  # target cell probability above this = foreground


class LossTerms(NamedTuple):
    """Float32 0-d tensors, all on the autograd graph: `loss = flow + cellprob`."""

    loss: Tensor
    flow: Tensor
    cellprob: Tensor


def _check_valid(valid: Tensor | None, batch: int, height: int, width: int) -> Tensor | None:
    """`valid` as a bool (B, H, W) tensor (None stays None); ValueError for a wrong shape."""
    if valid is None:
        return None
    if tuple(valid.shape) != (batch, height, width):
        raise ValueError(f"valid must have shape (B, H, W) = {(batch, height, width)}, got {tuple(valid.shape)}")
    return valid if valid.dtype == torch.bool else valid != 0


def _zero_ignored(values: Tensor, keep: Tensor | None) -> Tensor:
    """`values` with ignored entries replaced by 0 (before any arithmetic, so NaN/inf there reach neither the loss
    nor its gradient); unchanged when keep is None."""
    return values if keep is None else torch.where(keep, values, values.new_zeros(()))


def _masked_mean(values: Tensor, keep: Tensor, count: Tensor) -> Tensor:
    """Sum of `values` where `keep` (broadcast) over `count` kept entries; 0 with a graph when count is 0."""
    return _zero_ignored(values, keep).sum() / torch.clamp(count, min=1.0)


def cellpose_loss_terms(output: Tensor, target: Tensor, valid: Tensor | None = None) -> LossTerms:
    """The Cellpose segmentation loss and its two parts.

    output: (B, K + 3, H, W) float (any float dtype, e.g. bf16 under autocast); the last three channels are
        [dY, dX, cellprob logit] with flows at 5x unit length; the K leading class channels (if any) are unused here.
    target: (B, 3, H, W) float [cellprob in [0, 1], dY, dX], unit flows.
    valid: optional (B, H, W) bool or numeric mask, nonzero = pixel counts, 0 = ignored.
    Returns LossTerms of float32 0-d tensors:
        flow = mean over counted pixels and both flow channels of (output flow - 5 * target flow)^2, halved;
        cellprob = mean over counted pixels of BCE-with-logits(cellprob logit, target cellprob > 0.5);
        loss = flow + cellprob. With no counted pixel at all, every term is 0 and still has a graph.
    Raises ValueError for mismatched shapes.
    """
    if output.ndim != 4 or output.shape[1] < 3:
        raise ValueError(f"output must be (B, K + 3, H, W) with [.., dY, dX, cellprob], got {tuple(output.shape)}")
    if target.ndim != 4 or target.shape[1] != 3:
        raise ValueError(f"target must be (B, 3, H, W) [cellprob, dY, dX], got {tuple(target.shape)}")
    batch, _, height, width = output.shape
    if (target.shape[0], target.shape[2], target.shape[3]) != (batch, height, width):
        raise ValueError(f"target {tuple(target.shape)} does not match output {tuple(output.shape)} in B, H, W")
    keep = _check_valid(valid, batch, height, width)

    pred_flow = _zero_ignored(output[:, -3:-1].float(), None if keep is None else keep[:, None])
    pred_logit = _zero_ignored(output[:, -1].float(), keep)
    target = _zero_ignored(target.float(), None if keep is None else keep[:, None])
    flow_target = FLOW_SCALE * target[:, 1:3]
    cellprob_target = (target[:, 0] > CELLPROB_THRESHOLD).float()

    squared_error = (pred_flow - flow_target).square()
    bce = F.binary_cross_entropy_with_logits(pred_logit, cellprob_target, reduction="none")
    if keep is None:
        flow = squared_error.mean() / 2.0
        cellprob = bce.mean()
    else:
        n_kept = keep.sum(dtype=torch.float32)
        flow = _masked_mean(squared_error, keep[:, None], 2.0 * n_kept) / 2.0
        cellprob = _masked_mean(bce, keep, n_kept)
    return LossTerms(loss=flow + cellprob, flow=flow, cellprob=cellprob)


def cellpose_loss(output: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """The Cellpose segmentation loss as a float32 0-d tensor (the `loss` of `cellpose_loss_terms`, which see).

    output (B, K + 3, H, W) [.., dY, dX, cellprob logit]; target (B, 3, H, W) [cellprob, dY, dX];
    valid optional (B, H, W), nonzero = counts. Equals `cellpose.train._loss_fn_seg(target, output, device)`
    when valid is None or all ones.
    """
    return cellpose_loss_terms(output, target, valid).loss


def class_loss(
    class_logits: Tensor, class_labels: Tensor, class_weights: Tensor | None = None, valid: Tensor | None = None
) -> Tensor:
    """Weighted cross-entropy of the optional class head, as `cellpose.train._loss_fn_class`.

    class_logits: (B, K, H, W) float logits (any float dtype; computed in float32). From a Cellpose-layout
        network output these are `output[:, :-3]`.
    class_labels: (B, H, W) integer class per pixel in [0, K) (0 = background in Cellpose's semantic recipe);
        values at ignored pixels are not read.
    class_weights: optional (K,) per-class weight (e.g. `class_weights_from_counts`); None = all ones.
    valid: optional (B, H, W) bool or numeric mask, nonzero = pixel counts.
    Returns a float32 0-d tensor: sum over counted pixels of w[label] * -log softmax(logits)[label], divided by the
    sum of w[label] over counted pixels (PyTorch's weighted "mean" reduction); 0 with a graph if nothing counts.
    Raises ValueError for mismatched shapes, a non-integer label tensor or labels outside [0, K) at counted pixels.
    """
    if class_logits.ndim != 4:
        raise ValueError(f"class_logits must be (B, K, H, W), got {tuple(class_logits.shape)}")
    batch, n_classes, height, width = class_logits.shape
    if tuple(class_labels.shape) != (batch, height, width):
        raise ValueError(f"class_labels must be (B, H, W) = {(batch, height, width)}, got {tuple(class_labels.shape)}")
    if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be an integer tensor, got {class_labels.dtype}")
    if class_weights is not None and tuple(class_weights.shape) != (n_classes,):
        raise ValueError(f"class_weights must have shape ({n_classes},), got {tuple(class_weights.shape)}")
    keep = _check_valid(valid, batch, height, width)
    if keep is None:
        keep = torch.ones_like(class_labels, dtype=torch.bool)

    labels = torch.where(keep, class_labels.long(), 0)
    if bool(((labels < 0) | (labels >= n_classes)).any()):
        raise ValueError(f"class_labels must lie in [0, {n_classes}) at counted pixels")
    nll = F.cross_entropy(_zero_ignored(class_logits.float(), keep[:, None]), labels, reduction="none")
    if class_weights is None:
        pixel_weight = keep.float()
    else:
        pixel_weight = torch.where(keep, class_weights.float().to(nll.device)[labels], 0.0)
    total_weight = pixel_weight.sum()
    return (pixel_weight * nll).sum() / torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))


def class_weights_from_counts(pixel_counts_per_class: np.ndarray | Tensor) -> Tensor:
    """Cellpose's semantic-head weights `1 / pclass` (paper/cpsam/semantic.py) from pixel counts.

    pixel_counts_per_class: (N_images, K) pixel counts per image and class (or class fractions per image),
        in which case pclass = the mean over images of each image's class fraction, exactly as semantic.py
        computes it (per image `(labels == c).mean()`, then the mean over images); or (K,) counts pooled over the
        training set, in which case pclass = counts / counts.sum().
    Returns a float32 (K,) tensor 1 / pclass. Raises ValueError for negative counts, an image with no pixel, or a
    class with no pixel at all (its weight would be infinite).
    """
    counts = np.asarray(
        pixel_counts_per_class.detach().cpu().numpy() if isinstance(pixel_counts_per_class, Tensor)
        else pixel_counts_per_class,
        dtype=np.float64,
    )
    if counts.ndim not in (1, 2) or counts.shape[-1] == 0:
        raise ValueError(f"pixel_counts_per_class must be (K,) or (N_images, K), got shape {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("pixel_counts_per_class must be finite and non-negative")
    if counts.ndim == 2:
        per_image = counts.sum(axis=1, keepdims=True)
        if (per_image == 0).any():
            raise ValueError(f"image(s) {np.flatnonzero(per_image[:, 0] == 0).tolist()} have no pixels")
        pclass = (counts / per_image).mean(axis=0)
    else:
        if counts.sum() == 0:
            raise ValueError("pixel_counts_per_class sums to 0")
        pclass = counts / counts.sum()
    if (pclass == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(pclass == 0).tolist()} have no pixels: weight 1/0 is undefined")
    return torch.from_numpy(1.0 / pclass).float()


# ------------------------------------------------------------------------- binary family (train/binary/objective.py)


def foreground_counts(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Pixel counts of the predicted foreground (argmax class > 0) against a class map, as float64 (3,) [TP, FP, FN].

    logits: (B, K, H, W) any float dtype; target: (B, H, W) integer classes (0 = background); valid: optional
    (B, H, W), nonzero = the pixel counts. No gradient (a metric).
    """
    batch, _, height, width = logits.shape
    keep = _check_valid(valid, batch, height, width)
    with torch.no_grad():
        pred, truth = logits.argmax(dim=1) > 0, target > 0
        if keep is not None:
            pred, truth = pred & keep, truth & keep
        tp = (pred & truth).sum(dtype=torch.float64)
        fp = (pred & ~truth).sum(dtype=torch.float64)
        fn = (~pred & truth).sum(dtype=torch.float64)
    return torch.stack([tp, fp, fn])


def dice_jaccard(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(Dice 2TP / (2TP + FP + FN), Jaccard TP / (TP + FP + FN)) float32 0-d tensors from [TP, FP, FN] counts;
    both are 1 when there is no foreground in prediction and target (nothing to get wrong)."""
    tp, fp, fn = counts.double().unbind()
    union = tp + fp + fn
    if float(union) == 0:
        one = torch.ones((), dtype=torch.float32)
        return one, one.clone()
    return (2 * tp / (2 * tp + fp + fn)).float(), (tp / union).float()


def soft_target_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0,
                     valid: Tensor | None = None) -> Tensor:
    """Distillation on soft targets (Hinton et al. 2015): T^2 x the mean over counted pixels of
    KL(teacher_probs || softmax(student_logits / T)) over the K classes.

    student_logits: (B, K, H, W) any float dtype (computed in float32); teacher_probs: (B, K, H, W) the teacher's
    softmax(logits / T), summing to 1 over K; valid: optional (B, H, W), nonzero = counts. The KL equals the soft
    cross-entropy minus the teacher's entropy: the same gradient, and 0 when the student matches the teacher.
    Returns a float32 0-d tensor on the graph (0 with a graph when no pixel counts).
    """
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 4:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} must both be (B, K, H, W)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, _, height, width = student_logits.shape
    keep = _check_valid(valid, batch, height, width)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    p = teacher_probs.float()
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1)  # (B, H, W); xlogy: 0 log 0 = 0
    per_pixel = kl if keep is None else _zero_ignored(kl, keep)
    count = torch.tensor(float(kl.numel()), device=kl.device) if keep is None else keep.sum(dtype=torch.float32)
    return per_pixel.sum() / torch.clamp(count, min=1.0) * float(temperature) ** 2
