"""Geometry + intensity augmentation of one training example: the Cellpose-SAM recipe (section 3.3-3.4).

`augment_example`: normalize (1st/99th percentiles) -> draw a `Geometry` -> warp image and targets
onto a T x T tile with one grid_sample grid -> intensity jitter (paper pre-training only). Targets
are [cellprob, dY, dX], unit flows (the loss scales them by 5 and re-thresholds cellprob at 0.5).

As cellpose 4.2's torch `transforms.random_rotate_and_resize`:
- output pixel (i, j) samples the source at M^-1 (j + 0.5 - T/2 - tx, i + 0.5 - T/2 - ty) about
  the source centre, M = rotation(angle) * scale (torchvision's inverse-affine helper,
  align_corners=False). Cellpose mirrors the full source before the affine; we fold the flip into
  the affine on full-image coordinates, so a window of the source gives the same crop;
- bilinear, zero fill, every channel times the warp of a ones channel (torchvision's fill=0 path:
  a slightly darker border, reproduced); X flow negated on flip; warped flows rotated by the angle;
- offsets: slack = max(0, L * scale - T) per axis, offset = slack * U - slack / 2; cellpose hands
  the (y, x) pair to torchvision's (x, y) helper (recipe pitfall 13): the x offset comes from the y
  slack and vice versa. `cellpose_offsets=True` reproduces it (matters for non-square sources only).

Random draws, all from the caller's numpy Generator, in this order: `rng.random(5)` for the
geometry [scale, angle, flip, offset a, offset b] (always five, whatever the config), then, if
`cfg.intensity`: `rng.random(3)` [invert, drop third, grayscale], `rng.permutation(C)`,
`rng.uniform(-r, r, C)` (log2 contrast gains), `rng.normal(0, sigma, C)` (brightness offsets).
Recompute mode draws nothing more. One integer seed therefore replays one sample exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cpsam.dynamics import masks_to_flows
from cpsam.transforms import normalize_percentile, percentile_bounds

SCALE_MODES = ("range", "log2")
TARGET_MODES = ("warp", "recompute")
MIN_DIAMETER = 5.0  # cellpose floors per-image diameters at 5 px
DEGENERATE_RANGE = 1e-3  # cellpose: a percentile range <= 1e-3 normalizes to zeros
MAX_EXACT_LABEL = 2**24  # labels travel through float32 grid_sample; beyond this they are not exact
N_GEOMETRY_DRAWS = 5


@dataclass
class AugmentConfig:
    """Augmentation settings (OmegaConf-friendly). Defaults = cellpose `train_seg` fine-tuning.

    scale_mode: "range" -> scale = (1 - s/2) + s * U with s = scale_range (clipped to [0, 2] as
        cellpose); "log2" -> scale = 2 ** (4U - 2), 0.25-4x (cellpose's scale_range=None).
    rescale_to_diam_mean: divide the scale by diameter / diam_mean (diameter floored at 5 px), i.e.
        first bring every image to the model's diam_mean (log2 + this: cells of 7.5-120 px at 30).
    cellpose_offsets: reproduce cellpose's swapped (y, x) crop offsets (see the module docstring).
    target_mode: "warp" = bilinearly warp unit flows (cached or computed on the full masks) and
        rotate them, as cellpose; "recompute" = warp the labels (nearest) and compute the exact flows
        of the crop with `cpsam.dynamics.masks_to_flows` (cellprob = warped labels > 0).
    Intensity (paper Methods, as quoted in MouseLand/cellpose#1306), applied after the warp in this
    order: inversion x -> 1 - x (p invert_p), third channel set to 0 (p drop_third_p), random
    channel permutation (if permute_channels), grayscale (p grayscale_p: mean of the non-empty
    channels in channel 0, the others 0), then per channel x -> gain * x + offset with
    gain = 2 ** U(-contrast_log2_range, contrast_log2_range) and offset ~ N(0, brightness_sigma).
    The paper's "contrast factor uniformly drawn between -2 and 2" is read as a log-uniform gain
    (a negative linear factor would duplicate the inversion); range 1.0 means gains 0.5-2x.
    All-zero channels of the crop stay zero through inversion, gain and offset.
    """

    scale_mode: str = "range"
    scale_range: float = 0.5
    rescale_to_diam_mean: bool = False
    diam_mean: float = 30.0
    rotate: bool = True
    flip: bool = True
    cellpose_offsets: bool = True
    target_mode: str = "warp"
    intensity: bool = False
    invert_p: float = 0.25
    drop_third_p: float = 0.1
    permute_channels: bool = True
    brightness_sigma: float = 0.2
    contrast_log2_range: float = 1.0
    grayscale_p: float = 0.1

    def __post_init__(self) -> None:
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
        for name in ("invert_p", "drop_third_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("scale_range", "diam_mean", "brightness_sigma", "contrast_log2_range"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def paper(cls) -> AugmentConfig:
        """Cellpose-SAM pre-training: diameter -> 30 px, then 0.25-4x, rotation, flip, intensity jitter."""
        return cls(scale_mode="log2", rescale_to_diam_mean=True, intensity=True, cellpose_offsets=False)

    @classmethod
    def finetune(cls) -> AugmentConfig:
        """cellpose `train_seg` fine-tuning: scale U(0.75, 1.25), rotation, flip, no intensity, no rescale."""
        return cls(scale_mode="range", scale_range=0.5, rescale_to_diam_mean=False, intensity=False)


@dataclass(frozen=True)
class Geometry:
    """One crop's geometry. scale: output px per source px; angle: degrees (vectors map by
    [[cos, -sin], [sin, cos]] in (x, y) px, y down); flip: mirror the source horizontally first;
    offset_y / offset_x: translation of the crop in output px along y / x, as applied."""

    scale: float
    angle: float
    flip: bool
    offset_y: float
    offset_x: float


@dataclass
class Crop:
    """One augmented sample. image (C, T, T) float32; target (3, T, T) float32 [cellprob, dY, dX]
    (unit flows); masks (T, T) int32 labels (original ids, 0 = background / padding); valid (T, T)
    float32 (0 on ignored pixels, 1 elsewhere including padding); the Geometry that made it."""

    image: np.ndarray
    target: np.ndarray
    masks: np.ndarray
    valid: np.ndarray
    geometry: Geometry


def to_model_channels(image: np.ndarray, n_channels: int) -> np.ndarray:
    """Bring an (H, W) or channel-first (C, H, W) image to the model's channels as cellpose 4's
    training does: keep the first n_channels, pad zeros at the end ((H, W) -> [img, 0, 0] for 3).
    An RGB image must be given as (3, H, W). Returns float32 (n_channels, H, W)."""
    arr = _channel_first(np.asarray(image))
    if n_channels < 1:
        raise ValueError(f"n_channels must be >= 1, got {n_channels}")
    out = np.zeros((n_channels, *arr.shape[1:]), np.float32)
    keep = min(n_channels, arr.shape[0])
    out[:keep] = arr[:keep]
    return out


def _channel_first(image: np.ndarray) -> np.ndarray:
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (C, H, W), got shape {image.shape}")
    return image[None] if image.ndim == 2 else image


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Per-channel 1st-99th percentile normalization of a whole (C, H, W) or (H, W) image
    (cpsam.transforms.normalize_percentile = cellpose's rule: no clipping, all-zero and degenerate
    channels -> 0). Returns float32 (C, H, W)."""
    image = _channel_first(np.asarray(image))
    return np.moveaxis(normalize_percentile(np.moveaxis(image, 0, -1)), -1, 0)


def percentile_bounds_per_channel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 (C,) 1st/99th percentiles of each channel of a (C, H, W) or (H, W) image,
    computed on float32 values as cellpose; cache them per image and pass them to `apply_bounds`."""
    image = _channel_first(np.asarray(image))
    bounds = [percentile_bounds(np.asarray(ch, np.float32)) for ch in image]
    return np.array([b[0] for b in bounds], np.float32), np.array([b[1] for b in bounds], np.float32)


def apply_bounds(image: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(x - lo) / (hi - lo) per channel of a (C, H, W) or (H, W) image (or any window of it);
    channels with hi - lo <= 1e-3 become 0. Equals `normalize_image` of the whole image when
    lo, hi come from `percentile_bounds_per_channel` of it. Returns float32 (C, H, W)."""
    image = _channel_first(np.asarray(image))
    lo, hi = np.asarray(lo, np.float32).reshape(-1), np.asarray(hi, np.float32).reshape(-1)
    if lo.shape != (image.shape[0],) or hi.shape != lo.shape:
        raise ValueError(f"bounds of shape {lo.shape}/{hi.shape} do not match {image.shape[0]} image channels")
    span = hi - lo
    ok = span > DEGENERATE_RANGE
    out = np.subtract(image, lo[:, None, None], dtype=np.float32)
    out /= np.where(ok, span, np.float32(1))[:, None, None]
    out[~ok] = 0
    return out


def geometry_from_uniforms(
    u: np.ndarray, src_hw: tuple[int, int], tile: int, cfg: AugmentConfig, diameter: float | None = None
) -> Geometry:
    """The Geometry made from five U(0, 1) draws [scale, angle, flip, offset a, offset b] by
    cellpose's formulas (float32 where cellpose uses float32). src_hw: source (H, W) in px; tile: T;
    diameter: the image's median object diameter in px (needed when cfg.rescale_to_diam_mean)."""
    u = np.asarray(u, np.float64).reshape(-1)
    if u.shape != (N_GEOMETRY_DRAWS,):
        raise ValueError(f"expected {N_GEOMETRY_DRAWS} uniform draws, got {u.shape[0]}")
    if cfg.scale_mode == "log2":
        scale = 2.0 ** (4.0 * u[0] - 2.0)
    else:
        s = max(0.0, min(2.0, float(cfg.scale_range)))
        scale = (1.0 - s / 2.0) + s * u[0]
    if cfg.rescale_to_diam_mean:
        if diameter is None or not np.isfinite(diameter):
            raise ValueError("rescale_to_diam_mean needs the image's median object diameter (got None/NaN)")
        scale /= max(float(diameter), MIN_DIAMETER) / cfg.diam_mean
    angle = float(np.float32(360.0 * u[1] - 180.0)) if cfg.rotate else 0.0
    flip = bool(u[2] > 0.5) if cfg.flip else False
    slack = np.maximum(0, np.array([src_hw[0] * scale - tile, src_hw[1] * scale - tile])).astype(np.float32)
    first, second = (slack * u[3:5].astype(np.float32) - slack * np.float32(0.5)).tolist()
    if cfg.cellpose_offsets:  # cellpose's (y, x) pair read as (x, y) by torchvision
        return Geometry(float(scale), angle, flip, offset_y=second, offset_x=first)
    return Geometry(float(scale), angle, flip, offset_y=first, offset_x=second)


def draw_geometry(
    rng: np.random.Generator, src_hw: tuple[int, int], tile: int, cfg: AugmentConfig, diameter: float | None = None
) -> Geometry:
    """Draw a crop Geometry with five `rng.random()` draws (see `geometry_from_uniforms`)."""
    return geometry_from_uniforms(rng.random(N_GEOMETRY_DRAWS), src_hw, tile, cfg, diameter)


def _affine(geometry: Geometry, src_hw: tuple[int, int]) -> tuple[float, ...]:
    """Coefficients (ax, bx, cx, ay, by, cy): source pixel x = ax*j' + bx*i' + cx (y alike) in the
    full unflipped image, for centred output coordinates j' = j - (T - 1)/2, i' = i - (T - 1)/2."""
    rot = math.radians(geometry.angle)
    cos, sin = math.cos(rot) / geometry.scale, math.sin(rot) / geometry.scale
    tx, ty = geometry.offset_x, geometry.offset_y
    sx = -1.0 if geometry.flip else 1.0
    height, width = src_hw
    return (sx * cos, sx * sin, (width - 1) / 2 - sx * (cos * tx + sin * ty),
            -sin, cos, (height - 1) / 2 - (-sin * tx + cos * ty))


def _corners(geometry: Geometry, src_hw: tuple[int, int], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Source (x, y) float64 (4,) of the four corner output pixels (full unflipped image px)."""
    ax, bx, cx, ay, by, cy = _affine(geometry, src_hw)
    half = (tile - 1) / 2
    sj, si = np.array([-half, -half, half, half]), np.array([-half, half, -half, half])
    return ax * sj + bx * si + cx, ay * sj + by * si + cy


def source_window(
    geometry: Geometry, src_hw: tuple[int, int], tile: int, margin: int = 2
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the source pixels (half-open, clipped to the image, never empty) that the
    crop's bilinear/nearest samples can touch, plus `margin` px. Read only this window of a
    memory-mapped image and pass it to `warp` with origin=(y0, x0)."""
    xs, ys = _corners(geometry, src_hw, tile)
    height, width = src_hw
    y0 = int(np.clip(math.floor(ys.min()) - margin, 0, height - 1))
    x0 = int(np.clip(math.floor(xs.min()) - margin, 0, width - 1))
    y1 = int(np.clip(math.ceil(ys.max()) + 1 + margin, y0 + 1, height))
    x1 = int(np.clip(math.ceil(xs.max()) + 1 + margin, x0 + 1, width))
    return y0, y1, x0, x1


def _grid(geometry: Geometry, src_hw: tuple[int, int], tile: int, window: tuple[int, int, int, int]) -> torch.Tensor:
    """float32 (1, T, T, 2) grid_sample grid (x, y normalized to `window`, align_corners=False)."""
    ax, bx, cx, ay, by, cy = _affine(geometry, src_hw)
    y0, y1, x0, x1 = window
    h, w = y1 - y0, x1 - x0
    centred = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
    grid = np.empty((1, tile, tile, 2), np.float32)
    # normalized g = (2 * (p - origin) + 1) / size - 1, computed in float64, stored as float32
    np.add(((2 * ax / w) * centred)[None, :], ((2 * bx / w) * centred + (2 * (cx - x0) + 1) / w - 1)[:, None],
           out=grid[0, ..., 0])
    np.add(((2 * ay / h) * centred)[None, :], ((2 * by / h) * centred + (2 * (cy - y0) + 1) / h - 1)[:, None],
           out=grid[0, ..., 1])
    return torch.from_numpy(grid)


def _fill_weight(grid: torch.Tensor, window: tuple[int, int, int, int]) -> np.ndarray:
    """float32 (T, T): what a bilinear grid_sample of a ones channel over `window` gives (the summed
    weight of the in-window neighbours), computed in closed form per axis instead of sampled."""
    g = grid[0].numpy()
    weight = np.ones(g.shape[:2], np.float32)
    for axis, size in ((0, window[3] - window[2]), (1, window[1] - window[0])):
        pos = ((g[..., axis] + 1) * size - 1) / 2  # grid_sample's unnormalization (align_corners=False)
        weight *= np.clip(np.minimum(pos + 1, size - pos), 0, 1)
    return weight


def _inside(geometry: Geometry, src_hw: tuple[int, int], tile: int) -> bool:
    """True when every sample of the crop lies inside the source (no zero fill anywhere)."""
    xs, ys = _corners(geometry, src_hw, tile)  # the footprint is a parallelogram: corners suffice
    return xs.min() >= 0 and xs.max() <= src_hw[1] - 1 and ys.min() >= 0 and ys.max() <= src_hw[0] - 1


def warp(
    image: np.ndarray,
    masks: np.ndarray,
    flows: np.ndarray | None,
    geometry: Geometry,
    tile: int,
    *,
    ignore: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
    src_hw: tuple[int, int] | None = None,
) -> Crop:
    """Warp one example onto a T x T tile with `geometry`.

    image (C, h, w) float32 (normalized), masks (h, w) integer labels, flows (2, h, w) unit
    [dY, dX] or None (recompute: exact flows of the warped labels), ignore (h, w) bool or None.
    They may be the full source (origin (0, 0), src_hw None) or a window of a source of size
    src_hw starting at origin=(y0, x0) that contains `source_window(geometry, src_hw, tile)`;
    the result is identical either way (everything is warped from that canonical window).
    One grid; one bilinear grid_sample for image + cellprob + flows and one nearest grid_sample for
    labels + ignore (the fill weight of torchvision's fill=0 path in closed form). Returns a Crop.
    """
    image, masks = _channel_first(np.asarray(image)), np.asarray(masks)
    h, w = image.shape[-2:]
    src_hw = (h, w) if src_hw is None else (int(src_hw[0]), int(src_hw[1]))
    shapes = [a.shape[-2:] for a in (masks, flows, ignore) if a is not None]
    if masks.ndim != 2 or any(shape != (h, w) for shape in shapes) or (flows is not None and len(flows) != 2):
        raise ValueError(f"image {image.shape}: masks, flows (2, H, W) and ignore must match its (H, W), got {shapes}")
    window = source_window(geometry, src_hw, tile)
    oy, ox = origin
    wy0, wy1, wx0, wx1 = window[0] - oy, window[1] - oy, window[2] - ox, window[3] - ox
    if wy0 < 0 or wx0 < 0 or wy1 > h or wx1 > w:
        raise ValueError(f"the {h}x{w} region at {tuple(origin)} does not contain the crop's source window {window}")
    cut = (slice(wy0, wy1), slice(wx0, wx1))
    lab = np.asarray(masks[cut])
    if lab.size and int(lab.max()) >= MAX_EXACT_LABEL:
        raise ValueError(f"labels must be < 2**24 to be warped exactly, got max {int(lab.max())}")
    n_img = image.shape[0]
    stack = np.empty((n_img + (3 if flows is not None else 0), wy1 - wy0, wx1 - wx0), np.float32)
    stack[:n_img] = image[(slice(None), *cut)]
    if flows is not None:
        stack[n_img] = lab > 0
        stack[n_img + 1 : n_img + 3] = flows[(slice(None), *cut)]
    near = np.empty((1 if ignore is None else 2, *lab.shape), np.float32)
    near[0] = lab
    if ignore is not None:
        near[1] = ignore[cut]
    grid = _grid(geometry, src_hw, tile, window)
    lin = F.grid_sample(torch.from_numpy(stack)[None], grid, "bilinear", "zeros", align_corners=False)[0].numpy()
    if not _inside(geometry, src_hw, tile):
        lin *= _fill_weight(grid, window)  # torchvision's fill=0: times the warp of a ones channel
    nn = F.grid_sample(torch.from_numpy(near)[None], grid, "nearest", "zeros", align_corners=False)[0].numpy()
    crop_masks = nn[0].astype(np.int32)
    valid = 1.0 - nn[1] if ignore is not None else np.ones((tile, tile), np.float32)
    target = np.empty((3, tile, tile), np.float32)
    if flows is not None:
        d_y, d_x = lin[n_img + 1], (-lin[n_img + 2] if geometry.flip else lin[n_img + 2])
        theta = math.radians(geometry.angle)
        cos, sin = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        target[0] = lin[n_img]
        np.add(d_x * sin, d_y * cos, out=target[1])
        np.subtract(d_x * cos, d_y * sin, out=target[2])
        out_image = np.ascontiguousarray(lin[:n_img])
    else:
        target[0] = crop_masks > 0
        target[1:] = masks_to_flows(crop_masks)
        out_image = lin
    return Crop(out_image, target, crop_masks, valid.astype(np.float32, copy=False), geometry)


def random_intensity(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The paper's intensity augmentations (see AugmentConfig) on a (C, T, T) float32 crop, with
    draws from `rng` only (none when cfg.intensity is False). Returns a new float32 array."""
    if not cfg.intensity:
        return image
    n = image.shape[0]
    u_invert, u_drop, u_gray = rng.random(3)
    perm = rng.permutation(n)
    gain = np.exp2(rng.uniform(-cfg.contrast_log2_range, cfg.contrast_log2_range, n)).astype(np.float32)
    offset = rng.normal(0.0, cfg.brightness_sigma, n).astype(np.float32)
    out = np.array(image, np.float32, copy=True)
    nonempty = out.reshape(n, -1).any(axis=1)
    if u_invert < cfg.invert_p:
        out[nonempty] = 1.0 - out[nonempty]
    if u_drop < cfg.drop_third_p and n >= 3:
        out[2] = 0.0
        nonempty[2] = False
    if cfg.permute_channels:
        out, nonempty = out[perm], nonempty[perm]
    if u_gray < cfg.grayscale_p and nonempty.any():
        out = np.concatenate([out[nonempty].mean(axis=0, keepdims=True), np.zeros_like(out[1:])])
        nonempty = np.arange(n) == 0
    out *= np.where(nonempty, gain, np.float32(0))[:, None, None]  # empty channels stay exactly 0
    out += np.where(nonempty, offset, np.float32(0))[:, None, None]
    return out


def augment_example(
    image: np.ndarray,
    masks: np.ndarray,
    flows: np.ndarray | None,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    tile: int,
    diameter: float | None = None,
    ignore: np.ndarray | None = None,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    n_channels: int | None = None,
    apply_intensity: bool = True,
) -> Crop:
    """The whole per-sample pipeline: (H, W) or (C, H, W) image (raw values; numpy or a memmap),
    (H, W) labels, cached (2, H, W) unit flows or None, optional (H, W) bool ignore mask ->
    Crop of a T x T tile.

    Only the crop's source window is read (and normalized) when `bounds` (lo, hi per channel from
    `percentile_bounds_per_channel`) is given; without it the whole image is read for its
    percentiles. n_channels: bring the image to the model's channels (`to_model_channels`).
    target_mode "warp" with flows None computes the flows of the full masks (slow: cache them).
    apply_intensity=False leaves the jitter to the caller (e.g. after train.degrade, whose final
    re-normalization would undo it): call random_intensity(crop.image, rng, cfg) on the crop later.
    All random draws come from `rng` in the order given in the module docstring.
    """
    image = _channel_first(image)
    height, width = image.shape[-2:]
    if masks.shape != (height, width) or (bounds is not None and np.size(bounds[0]) != image.shape[0]):
        raise ValueError(f"masks {masks.shape} / bounds must match the image's (H, W) {(height, width)} / channels")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    geometry = draw_geometry(rng, (height, width), tile, cfg, diameter)
    y0, y1, x0, x1 = source_window(geometry, (height, width), tile)
    bounds = percentile_bounds_per_channel(image) if bounds is None else bounds
    lo, hi = (np.asarray(b, np.float32).reshape(-1) for b in bounds)
    # padded model channels are zeros before and after the warp: warp only the kept channels
    keep = image.shape[0] if n_channels is None else min(n_channels, image.shape[0])
    window_image = apply_bounds(image[:keep, y0:y1, x0:x1], lo[:keep], hi[:keep])
    if cfg.target_mode == "recompute":
        flows = None
    elif flows is None:
        flows = masks_to_flows(np.asarray(masks))
    cut = np.s_[..., y0:y1, x0:x1]
    flows, ignore = (None if a is None else np.asarray(a[cut]) for a in (flows, ignore))
    crop = warp(window_image, np.asarray(masks[cut]), flows, geometry, tile, ignore=ignore, origin=(y0, x0),
                src_hw=(height, width))
    if n_channels is not None and n_channels > keep:
        crop.image = to_model_channels(crop.image, n_channels)
    if apply_intensity:
        crop.image = random_intensity(crop.image, rng, cfg)
    return crop
