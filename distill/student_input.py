"""What the student sees of a training crop: the teacher's crop, its first `student.in_channels` channels, and
optionally the seed's flat-field correction and brightness augmentation (kd.flat_field, kd.brightness).

- Flat-field correction (distillCellSegTrack's `flatfield_correction`): each channel divided by its normalized
  Gaussian blur (sigma 30 px) relative to the blur's mean, x / (blur / mean(blur)). The blur is a normalized
  convolution (blur(x) / blur(1) with zero padding), so the crop's borders are not darkened. Deviation: the seed
  divides raw positive intensities; our crops are percentile-normalized (background near 0), so the divisor is
  floored at 0.1 x its mean and channels whose blur mean is ~0 are left unchanged (no division blow-up).
  `cpsam segment` does not apply it: a student trained with it needs flat-field-corrected inputs (the flag is
  recorded in its checkpoint's config, kd.flat_field).
- Brightness (the seed's invariance augmentation): with probability p the student's input is multiplied by a
  factor ~ U(low, high) (seed: p 0.5, 0.1-3); the teacher's targets stay those of the unchanged crop. The factor
  is drawn per sample from its key (`brightness_factor`), so a run replays exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FLOOR = 0.1  # smallest divisor of the flat-field correction, relative to the blur's mean
_BRIGHTNESS_STREAM = 0xB21  # a child stream of the sample's (seed, epoch, position): separate from the pipeline's


def gaussian_kernel_1d(sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalized 1-D Gaussian of `sigma` px, radius ceil(3 sigma): float32 (2r + 1,)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) float with zero padding (same size out, float32)."""
    k = gaussian_kernel_1d(sigma, x.device)
    c = x.shape[1]
    r = (k.numel() - 1) // 2
    y = F.conv2d(x.float(), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def flat_field_correct(x: Tensor, sigma: float = 30.0) -> Tensor:
    """Flat-field corrected (B, C, H, W) float32 crop (see the module docstring): x / max(b / mean(b), 0.1) where
    b = blur(x) / blur(1) (normalized convolution, Gaussian `sigma` px); channels with mean(b) ~ 0 unchanged."""
    x = x.float()
    blur = gaussian_blur(x, sigma) / gaussian_blur(torch.ones_like(x[:, :1]), sigma)
    mean = blur.mean(dim=(2, 3), keepdim=True)
    flat = mean.abs() > 1e-6
    ratio = torch.where(flat, blur / torch.where(flat, mean, torch.ones_like(mean)), torch.ones_like(blur))
    return x / ratio.clamp(min=FLOOR)


def brightness_factor(seed: int, epoch: int, position: int, p: float, low: float, high: float) -> float:
    """The brightness factor of one sample: U(low, high) with probability p, else 1.0; a pure function of
    (seed, epoch, position). high <= 0 means off (always 1.0)."""
    if high <= 0 or p <= 0:
        return 1.0
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(position),
                                                                        _BRIGHTNESS_STREAM])))
    u_apply, u_factor = rng.random(2)
    return float(low + (high - low) * u_factor) if u_apply < p else 1.0


def student_view(image: Tensor, channels: int, *, flat_field: bool = False, sigma: float = 30.0,
                 brightness: Tensor | None = None) -> Tensor:
    """The student's input for a (B, C, T, T) teacher crop: the first `channels` channels (zero-padded when the
    crop has fewer), flat-field corrected if asked, times the per-sample brightness factors (B,) if given.
    Returns float32 (B, channels, T, T)."""
    x = image[:, :channels].float()
    if x.shape[1] < channels:
        x = torch.cat([x, x.new_zeros(x.shape[0], channels - x.shape[1], *x.shape[2:])], dim=1)
    if flat_field:
        x = flat_field_correct(x, sigma)
    if brightness is not None:
        x = x * brightness.float().view(-1, 1, 1, 1).to(x.device)
    return x
