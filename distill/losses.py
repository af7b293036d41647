"""Knowledge-distillation losses: the seed's KD loss (distillCellSegTrack), done right by default, and adapters.

    loss = alpha * feature term + beta * (flow term + cellprob term)            (alpha = 2, beta = 1: the seed's)

- flow term: mean over pixels and both flow channels of (student flow - teacher flow)^2, halved. Both are raw
  network outputs at 5x unit length, i.e. exactly `train.loss.cellpose_loss_terms`' flow term with the unit
  target teacher flow / FLOW_SCALE (tests check the equality).
- cellprob term: BCE-with-logits(student logit / T, sigmoid(teacher logit / T)) (soft targets), times T^2 so that
  the gradient scale does not shrink with the temperature T (Hinton et al. 2015; T = 1 is the seed's term).
- feature term, `kind`:
  "mse" (default): the true mean squared error mean((teacher - student)^2);
  "distillcellsegtrack": the seed's published term (mean(teacher - student))^2, the square of the mean
  difference; it is zero whenever the errors cancel (kept only to reproduce the seed's numbers).
- `FeatureAdapter`: a 1x1 conv from the student's channels to the teacher's, then a resize to the teacher's map
  size (area averaging when shrinking, bilinear when enlarging), for teacher and student maps that differ.
All arithmetic is float32 (bf16 autocast outputs are upcast first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.loss import FLOW_SCALE

FEATURE_LOSSES = ("mse", "distillcellsegtrack")


class KDTerms(NamedTuple):
    """Float32 0-d tensors on the autograd graph: loss = alpha * feature + beta * (flow + cellprob)."""

    loss: Tensor
    feature: Tensor
    flow: Tensor
    cellprob: Tensor


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")


def feature_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """Feature term between two (B, C, h, w) maps of the same shape (any float dtype; computed in float32).

    kind "mse": mean((teacher - student)^2); "distillcellsegtrack": (mean(teacher - student))^2.
    Returns a float32 0-d tensor. Raises ValueError for a shape mismatch or an unknown kind.
    """
    _check_pair(student, teacher, "features")
    diff = teacher.float() - student.float()
    if kind == "mse":
        return diff.square().mean()
    if kind == "distillcellsegtrack":
        return diff.mean().square()
    raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")


def flow_kd_loss(student_output: Tensor, teacher_output: Tensor) -> Tensor:
    """Flow term: mean over pixels and the 2 flow channels of (student - teacher)^2, halved (float32 0-d).

    Both (B, 3, H, W) [dY, dX, cellprob logit] raw outputs (flows at FLOW_SCALE x unit length). Written against
    the unit target teacher / FLOW_SCALE so the convention is the one of train.loss.
    """
    _check_pair(student_output, teacher_output, "outputs")
    unit_target = teacher_output[:, :2].float() / FLOW_SCALE
    return (student_output[:, :2].float() - FLOW_SCALE * unit_target).square().mean() / 2.0


def cellprob_kd_loss(student_output: Tensor, teacher_output: Tensor, temperature: float = 1.0) -> Tensor:
    """Cellprob term: T^2 * mean BCE-with-logits(student logit / T, sigmoid(teacher logit / T)) (float32 0-d).

    Outputs (B, 3, H, W); channel 2 is the cellprob logit. Raises ValueError for T <= 0.
    """
    _check_pair(student_output, teacher_output, "outputs")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    soft = torch.sigmoid(teacher_output[:, 2].float() / t)
    return F.binary_cross_entropy_with_logits(student_output[:, 2].float() / t, soft) * (t * t)


def kd_loss(student_output: Tensor, teacher_output: Tensor, student_features: Tensor | None = None,
            teacher_features: Tensor | None = None, *, alpha: float = 2.0, beta: float = 1.0, temperature: float = 1.0,
            feature_kind: str = "mse") -> KDTerms:
    """The KD loss of the module docstring.

    student_output, teacher_output: (B, 3, H, W) [dY, dX, cellprob logit] raw outputs.
    student_features, teacher_features: (B, C, h, w) maps of one shape (adapt the student's first), or both None
    (no feature term: it is then 0 with a graph).
    Returns KDTerms of float32 0-d tensors.
    """
    flow = flow_kd_loss(student_output, teacher_output)
    cellprob = cellprob_kd_loss(student_output, teacher_output, temperature)
    if (student_features is None) != (teacher_features is None):
        raise ValueError("give both student and teacher features, or neither")
    if student_features is None:
        feature = student_output.float().sum() * 0.0
    else:
        feature = feature_loss(student_features, teacher_features, feature_kind)
    return KDTerms(alpha * feature + beta * (flow + cellprob), feature, flow, cellprob)


class FeatureAdapter(nn.Module):
    """Student feature map -> the teacher's shape: 1x1 conv (when channels differ) then resize (when sizes differ).

    Args:
        student_shape: (C_s, h_s, w_s) of the student's map for the training tile.
        teacher_shape: (C_t, h_t, w_t) of the teacher's map.
    With equal shapes the adapter is the identity and has no parameters (the seed's CPnet-to-CPnet case).
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.student_shape = tuple(int(v) for v in student_shape)
        self.teacher_shape = tuple(int(v) for v in teacher_shape)
        c_s, c_t = self.student_shape[0], self.teacher_shape[0]
        self.proj = nn.Conv2d(c_s, c_t, kernel_size=1) if c_s != c_t else None

    @property
    def is_identity(self) -> bool:
        """True when student and teacher maps already have one shape."""
        return self.student_shape == self.teacher_shape

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_s, h, w) -> (B, C_t, h_t, w_t) (float dtype of x)."""
        if self.proj is not None:
            x = self.proj(x)
        size = tuple(self.teacher_shape[1:])
        if tuple(x.shape[-2:]) != size:
            shrinking = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
            x = F.interpolate(x, size=size, mode="area") if shrinking else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False)
        return x
