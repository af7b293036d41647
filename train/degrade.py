"""Image degradations for training (shot noise, blur, downsampling): cellpose 4.2's `denoise.add_noise`, per sample.

Each degraded sample: Gaussian blur -> keep every ds-th row (and column) and upsample bilinearly back -> Poisson
noise on photon_scale * clamp(x, 0) -> each channel re-normalized to its 1st-99th percentiles (recipe section 3.4).
`draw_degradation` draws a sample's parameters from a numpy Generator; `degrade_batch` applies them in torch on
any device, a sample's result never depending on its batch-mates. Fast on one CPU thread: blur + subsampling are
two matrix products at low resolution, Poisson counts come from a numba inverse-CDF kernel, percentiles are exact
order statistics (topk, or a histogram of the integer counts) combined exactly like torch.quantile.
Deviations from add_noise: the kernel half-width is per sample (add_noise: from the batch's largest sigma);
`aniso_p` mixes add_noise's iso=True/False per sample; sigma 0 = no blur on that axis (add_noise: a 1-px shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

_POISSON_INVERSE_MAX_RATE = 64.0  # rates above go to torch.poisson (exp(-rate) stays a normal float32)
_INVERSE_INTEGERS = np.concatenate([[0.0], 1.0 / np.arange(1, 1025, dtype=np.float64)])  # 1/k, k = 1..1024


@dataclass
class DegradeConfig:
    """How often and how strongly training samples are degraded (OmegaConf-friendly: scalars only).

    fraction: probability that a sample is degraded at all (the paper's "50 % of each batch", unverified).
    poisson_p, alpha, beta: probability of Poisson noise; photon scale k ~ Gamma(shape alpha, rate beta), k >= 1.
    blur_p, gblur: probability of Gaussian blur (forced for downsampled samples); blur strength factor.
    downsample_p, ds_max: probability of downsampling; factor ds uniform in 2..ds_max.
    uniform_blur: add_noise's uniform_blur sigma rule for isotropic samples.
    aniso_p: probability that a degraded sample is anisotropic (add_noise's iso=False: sigma_x = sigma_y / 10,
        downsampling along Y only). The paper's iso/aniso mixture is not public; 0.25 is our choice.
    diam_mean: diameter (pixels) at which sigmas take their nominal values; sigmas scale with diameter / diam_mean.
    """

    fraction: float = 0.5
    poisson_p: float = 0.7
    alpha: float = 4.0
    beta: float = 0.7
    blur_p: float = 0.7
    gblur: float = 1.0
    downsample_p: float = 0.7
    ds_max: int = 7
    uniform_blur: bool = False
    aniso_p: float = 0.25
    diam_mean: float = 30.0

    def __post_init__(self) -> None:
        for name in ("fraction", "poisson_p", "blur_p", "downsample_p", "aniso_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DegradeConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("alpha", "beta", "gblur", "diam_mean"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DegradeConfig.{name} must be > 0, got {getattr(self, name)}")
        if int(self.ds_max) != self.ds_max or self.ds_max < 2:
            raise ValueError(f"DegradeConfig.ds_max must be an integer >= 2, got {self.ds_max}")


@dataclass(frozen=True)
class DegradeParams:
    """Fully drawn degradation of one sample (defaults: nothing but the final re-normalization).

    downsample, ds: keep every ds-th row (and column when iso), then upsample bilinearly to full size.
    blur, sigma_y, sigma_x: Gaussian blur, standard deviations in pixels along Y and X (<= 1e-6: none).
    iso: False = downsample along Y only (add_noise's iso=False); sigmas are explicit either way.
    poisson, photon_scale: x <- Poisson(photon_scale * clamp(x, 0)).
    noise_seed: seed of the torch.Generator (on the image's device) that draws this sample's Poisson noise.
    """

    downsample: bool = False
    ds: int = 1
    blur: bool = False
    sigma_y: float = 0.0
    sigma_x: float = 0.0
    iso: bool = True
    poisson: bool = False
    photon_scale: float = 1.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.downsample and (int(self.ds) != self.ds or self.ds < 2):
            raise ValueError(f"DegradeParams.ds must be an integer >= 2 when downsample is set, got {self.ds}")
        if self.blur and not (0 <= self.sigma_y < math.inf and 0 <= self.sigma_x < math.inf):
            raise ValueError(f"DegradeParams sigmas must be finite and >= 0, got {self.sigma_y}, {self.sigma_x}")
        if self.poisson and not 0 < self.photon_scale < math.inf:
            raise ValueError(f"DegradeParams.photon_scale must be finite and > 0, got {self.photon_scale}")
        if not 0 <= self.noise_seed < 2**63:
            raise ValueError(f"DegradeParams.noise_seed must be in [0, 2**63), got {self.noise_seed}")


def draw_degradation(rng: np.random.Generator, cfg: DegradeConfig, diameter: float) -> DegradeParams | None:
    """Draw one sample's degradation as add_noise does for a batch of one; None (not degraded) w.p. 1 - fraction.

    diameter: typical object diameter of the sample in pixels (after any rescaling); sigmas scale with
    diameter / cfg.diam_mean. Always makes the same draws in the same order (7 uniforms, ds, an exponential, a
    gamma, the noise seed), whatever the outcome, so a sample is replayable from the generator's seed.
    Rules (add_noise's): downsample w.p. downsample_p with ds ~ U{2..ds_max}; blur w.p. blur_p, always when
    downsampled; isotropic sigma = (d/dm) * 5 * clip(0.5 * Exp(1), 0.1, 1) * gblur, or with uniform_blur
    (d/dm) * gblur * (1/gblur + (1 - 1/gblur) * u) with u ~ U(0, 1), u = ds / 2 / gblur when downsampled;
    anisotropic sigma_y = (d/dm) * gblur * u, u = clip(ds / gblur + U(-0.35, 0.35), 0.05, 1.5) when downsampled,
    sigma_x = sigma_y / 10; Poisson w.p. poisson_p with photon scale max(1, Gamma(alpha, rate beta)).
    """
    if not (math.isfinite(diameter) and diameter > 0):
        raise ValueError(f"draw_degradation needs a finite diameter > 0 (pixels), got {diameter}")
    u_apply, u_aniso, u_down, u_blur, u_sigma, u_jitter, u_poisson = rng.random(7)
    ds_draw = int(rng.integers(2, int(cfg.ds_max) + 1))
    e_sigma = float(rng.exponential(1.0))
    k_draw = float(rng.gamma(cfg.alpha, 1.0 / cfg.beta))
    noise_seed = int(rng.integers(0, 2**63 - 1))
    if u_apply >= cfg.fraction:
        return None
    iso = bool(u_aniso >= cfg.aniso_p)
    downsample = bool(u_down < cfg.downsample_p)
    ds = ds_draw if downsample else 1
    blur = downsample or bool(u_blur < cfg.blur_p)
    relative = diameter / cfg.diam_mean
    gblur = cfg.gblur
    sigma_y = sigma_x = 0.0
    if blur and not iso:
        strength = float(np.clip(ds / gblur + 0.7 * u_jitter - 0.35, 0.05, 1.5)) if downsample else float(u_sigma)
        sigma_y = relative * gblur * strength
        sigma_x = sigma_y / 10.0
    elif blur and cfg.uniform_blur:
        strength = ds / 2.0 / gblur if downsample else float(u_sigma)
        sigma_y = sigma_x = relative * gblur * (1.0 / gblur + (1.0 - 1.0 / gblur) * strength)
    elif blur:
        sigma_y = sigma_x = relative * 5.0 * float(np.clip(0.5 * e_sigma, 0.1, 1.0)) * gblur
    poisson = bool(u_poisson < cfg.poisson_p)
    return DegradeParams(downsample=downsample, ds=ds, blur=blur, sigma_y=sigma_y, sigma_x=sigma_x, iso=iso,
                         poisson=poisson, photon_scale=max(1.0, k_draw), noise_seed=noise_seed)


def _gaussian_band(sigma: float, half_width: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix of a normalized Gaussian with taps -(half_width-1)..half_width-1, zero padding at the edges."""
    radius = half_width - 1
    taps = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    if sigma > 1e-6:  # below, the Gaussian is a delta in float arithmetic (and 2 sigma^2 would underflow)
        kernel = torch.exp(-taps * taps / (2.0 * sigma * sigma))
        kernel = kernel / kernel.sum()
    else:
        kernel = (taps == 0).to(dtype)
    padded = torch.zeros(2 * n - 1 + 2 * radius, device=device, dtype=dtype)  # padded[n - 1 + t] = kernel[t]
    padded[n - 1 : n + 2 * radius] = kernel
    diagonals = padded[radius : radius + 2 * n - 1]  # diagonals[m] = weight of offset j - i = m - (n - 1)
    return diagonals.as_strided((n, n), (1, 1)).flip(0)  # band[i, j] = diagonals[j - i + n - 1]


def _axis_matrix(params: DegradeParams, n: int, sigma: float, downsampled: bool, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """(n // ds rounded up, n) linear map of one axis: Gaussian blur with add_noise's half-width
    max(8, 2 * floor(sigma_max)) (of this sample; add_noise takes the batch maximum), then every ds-th sample."""
    if params.blur:
        half_width = max(8, 2 * int(max(params.sigma_y, params.sigma_x)))
        matrix = _gaussian_band(sigma, half_width, n, device, dtype)
    else:
        matrix = torch.eye(n, device=device, dtype=dtype)
    return matrix[:: params.ds] if downsampled else matrix


def _blur_and_downsample(images: torch.Tensor, params: Sequence[DegradeParams]) -> torch.Tensor:
    """Blur then downsample (B, C, H, W) images sharing ds and iso: (R_y @ x @ R_x^T) at low resolution, then
    F.interpolate(size=(H, W), mode="bilinear", align_corners=False) back to full size (add_noise's call)."""
    (height, width), device, dtype = images.shape[-2:], images.device, images.dtype
    rows = torch.stack([_axis_matrix(p, height, p.sigma_y, p.downsample, device, dtype) for p in params])
    cols = torch.stack([_axis_matrix(p, width, p.sigma_x, p.downsample and p.iso, device, dtype) for p in params])
    small = rows[:, None] @ images @ cols[:, None].transpose(-1, -2)
    if not params[0].downsample:
        return small
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


@njit(cache=True, nogil=True, inline="always")
def _splitmix_uniform(key, index):
    """Uniform [0, 1) float64: output `index` of the SplitMix64 generator started at state `key` (uint64)."""
    z = key + np.uint64(index + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.float64((z ^ (z >> np.uint64(31))) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def _poisson_inverse_cdf(rate, exp_neg_rate, key, counts, inverse_integers, max_rate):
    """counts[i] = smallest k with PoissonCDF(k; rate[i]) >= u_i (float64 CDF, u_i = _splitmix_uniform(key, i)),
    or -1 where rate[i] > max_rate; returns how many are -1. 64 lanes at a time so that the loops vectorize;
    lanes that are done keep updating harmlessly (their CDF only grows)."""
    lanes = 64
    lam, term, cdf, u, k = np.empty(lanes), np.empty(lanes), np.empty(lanes), np.empty(lanes), np.empty(lanes)
    kmax = inverse_integers.size - 1
    n_large = 0
    for start in range(0, rate.size, lanes):
        m = min(lanes, rate.size - start)
        for i in range(m):
            large = rate[start + i] > max_rate
            n_large += large
            lam[i] = 0.0 if large else rate[start + i]
            term[i] = 1.0 if large else exp_neg_rate[start + i]  # a CDF of 1 stops the lane at once
            cdf[i] = term[i]
            u[i] = _splitmix_uniform(key, start + i)
            k[i] = -1.0 if large else 0.0
        j = 0
        active = 1
        while active > 0 and j < kmax:
            j += 1
            active = 0
            for i in range(m):
                below = u[i] > cdf[i]
                k[i] += below
                active += below
                term[i] *= lam[i] * inverse_integers[j]
                cdf[i] += term[i]
        counts[start : start + m] = k[:m]
    return n_large


@njit(cache=True, nogil=True)
def _count_histograms(rows):
    """(R, max + 1) int64 histograms of the rows of a (R, n) array of non-negative integer values."""
    hist = np.zeros((rows.shape[0], int(rows.max()) + 1), np.int64)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            hist[r, int(rows[r, i])] += 1
    return hist


def poisson_counts(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact Poisson draws for a non-negative float tensor of rates (any shape): same shape/dtype, integer values.
    CUDA: torch.poisson(rate, generator). CPU (faster than torch.poisson at normalized-image rates): inverse
    CDF of SplitMix64 uniforms keyed by one draw of `generator`, in numba; rates above 64 use torch.poisson."""
    if rate.device.type != "cpu":
        return torch.poisson(rate, generator=generator)
    flat = rate.detach().reshape(-1).to(torch.float32).contiguous()
    key = np.uint64(int(torch.randint(0, 2**63 - 1, (1,), generator=generator)))
    counts = torch.empty_like(flat)
    n_large = _poisson_inverse_cdf(flat.numpy(), torch.exp(-flat).numpy(), key, counts.numpy(), _INVERSE_INTEGERS,
                                   _POISSON_INVERSE_MAX_RATE)
    if n_large:
        large = counts < 0
        counts[large] = torch.poisson(flat[large], generator=generator)
    return counts.reshape(rate.shape).to(rate.dtype)


def _order_statistics(rows: torch.Tensor, ranks: list[int], integer_valued: bool) -> torch.Tensor:
    """(R, len(ranks)) values of the 0-based order statistics `ranks` of each row of rows (R, n)."""
    n = rows.shape[-1]
    if integer_valued:  # histogram of non-negative integer counts: exact, cheaper than a selection
        if rows.device.type == "cpu":
            histogram = torch.from_numpy(_count_histograms(rows.contiguous().numpy()))
        else:
            bins = int(rows.max().item()) + 1
            offsets = torch.arange(rows.shape[0], device=rows.device)[:, None] * bins
            histogram = torch.bincount((rows.long() + offsets).reshape(-1), minlength=rows.shape[0] * bins)
            histogram = histogram.reshape(rows.shape[0], bins)
        wanted = torch.tensor(ranks, device=rows.device).expand(rows.shape[0], -1).contiguous()
        return torch.searchsorted(histogram.cumsum(-1), wanted, right=True).to(rows.dtype)
    low, high = [r for r in ranks if r < n // 2], [r for r in ranks if r >= n // 2]
    smallest = torch.topk(rows, max(low) + 1, dim=-1, largest=False).values if low else None  # ascending
    largest = torch.topk(rows, n - min(high), dim=-1).values if high else None  # descending
    return torch.stack([smallest[:, r] if r < n // 2 else largest[:, n - 1 - r] for r in ranks], dim=-1)


def percentile_normalize(images: torch.Tensor, integer_valued: bool = False) -> torch.Tensor:
    """add_noise's re-normalization (denoise.img_norm): each channel of (N, C, H, W) float images becomes
    (x - p1) / (p99 - p1), p1/p99 its 1st/99th percentiles as torch.quantile computes them; channels with
    p99 - p1 <= 1e-3 stay unchanged. integer_valued=True promises non-negative integers (Poisson counts): a
    histogram gives the exact order statistics. Returns a new tensor of the same shape and dtype."""
    rows = images.reshape(images.shape[0] * images.shape[1], -1)
    # ranks in float64 from float32 q, weights in the image dtype: torch.quantile's arithmetic with img_norm's q
    ranks = [float(np.float32(q)) * (rows.shape[-1] - 1) for q in (0.01, 0.99)]
    below, above = [math.floor(r) for r in ranks], [math.ceil(r) for r in ranks]
    values = _order_statistics(rows, below + above, integer_valued)
    weights = torch.tensor([r - b for r, b in zip(ranks, below, strict=True)], dtype=rows.dtype, device=rows.device)
    percentiles = torch.lerp(values[:, :2], values[:, 2:], weights)
    low, high = percentiles[:, :1], percentiles[:, 1:]
    has_range = high - low > 1e-3  # without: (x - 0) / 1, exactly x
    return ((rows - torch.where(has_range, low, 0.0)) / torch.where(has_range, high - low, 1.0)).reshape(images.shape)


@torch.no_grad()
def degrade_batch(images: torch.Tensor, params: Sequence[DegradeParams | None]) -> torch.Tensor:
    """Degrade images (B, C, H, W) float (normalized, ~[0, 1]), any device; params[b] = None leaves sample b as it
    is. Returns a new tensor, same shape/dtype/device: blur -> downsample -> Poisson -> re-normalization per sample."""
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point()):
        raise ValueError(f"degrade_batch expects a float (B, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    if len(params) != images.shape[0] or not all(p is None or isinstance(p, DegradeParams) for p in params):
        raise ValueError(f"degrade_batch needs one DegradeParams or None per image: {len(params)} for "
                         f"{images.shape[0]} images")
    out = images.clone()
    chosen = [i for i, p in enumerate(params) if p is not None]
    groups: dict[tuple[int, bool], list[int]] = {}  # samples that share the low-resolution shape
    for i in chosen:
        p = params[i]
        if p.blur or p.downsample:
            groups.setdefault((p.ds if p.downsample else 1, p.downsample and p.iso), []).append(i)
    for members in groups.values():
        out[members] = _blur_and_downsample(images[members], [params[i] for i in members])
    noisy = [i for i in chosen if params[i].poisson]
    for i in noisy:
        generator = torch.Generator(device=images.device).manual_seed(params[i].noise_seed)
        out[i] = poisson_counts(out[i].clamp(min=0.0).mul_(params[i].photon_scale), generator)
    clean = [i for i in chosen if not params[i].poisson]
    for group, integer_valued in ((noisy, True), (clean, False)):
        if group:
            out[group] = percentile_normalize(out[group], integer_valued=integer_valued)
    return out


def degrade_one(image: torch.Tensor | np.ndarray, params: DegradeParams | None) -> torch.Tensor | np.ndarray:
    """One (C, H, W) image (e.g. in a DataLoader worker): a tensor gives a tensor of its dtype, an array gives
    a float32 array; a new object either way, equal to the input when params is None."""
    if image.ndim != 3:
        raise ValueError(f"degrade_one expects a (C, H, W) image, got shape {tuple(image.shape)}")
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return degrade_batch(tensor[None], [params])[0].numpy()
    return degrade_batch(image[None], [params])[0]
