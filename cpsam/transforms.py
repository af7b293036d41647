"""Image -> network-input transforms and the tile algebra of Cellpose inference.

Every function here reproduces one step of `cellpose` inference (4.2.1.1 for CP-SAM, 3.1.1.2 for
the classic CPnet; the two share all steps except where noted) so that our flows equal theirs:

- `to_channels_last`, `select_channels`: which image channels feed the network.
- `normalize_percentile`: per-channel 1st/99th percentile scaling of the whole image.
- `scaled_shape`, `resize_image`: diameter rescaling (OpenCV bilinear, as cellpose).
- `get_pad_yx`, `tile_starts`, `taper_1d`, `flip_pattern`: padding, overlapping tiles, the sigmoid
  taper used to blend them, and the flip pattern of test-time augmentation.

Spec: ../shared/research/cpsam_recipe.md sections 2.1-2.4 and pitfalls 7-10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# Cellpose pads every side by at least DIV // 2 * EXTRA pixels and up to a multiple of DIV.
PAD_DIV = 16
PAD_EXTRA = 1
# Percentiles are computed on a strided subsample above this many pixels (cellpose: 224**3).
PERCENTILE_SUBSAMPLE_ABOVE = 224**3
PERCENTILE_SUBSAMPLE_STEP = 224
# The taper is defined on a tile of at least this many pixels (cellpose's historic 224 tile).
TAPER_MIN_SIZE = 224
TAPER_MARGIN = 20
TAPER_SLOPE = 7.5
# Largest image (pixels) the network may see after diameter rescaling: about 2**30 = 1.07e9 pixels,
# i.e. 4 GiB per float32 channel (an 8192 x 8192 image at up to 4x). Above it a typo such as
# --diameter 0.001 would try to allocate terabytes.
MAX_SCALED_PIXELS = 2**30


def to_channels_last(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """Return a view of a 2-D (H, W) or 3-D image as (H, W, C).

    Without `channel_axis` a 3-D image's channel axis is guessed as cellpose 4 does: axis 0 if
    shape[0] < shape[-1], else axis 2. Raises ValueError for other dimensionalities.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        if channel_axis is not None:
            raise ValueError(f"2-D image of shape {image.shape} has no channel axis {channel_axis}")
        return image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected a 2-D (H, W) or 3-D (with channels) image, got shape {image.shape}")
    if channel_axis is None:
        channel_axis = 0 if image.shape[0] < image.shape[-1] else 2
    return np.moveaxis(image, channel_axis, -1)


def select_channels(
    image: np.ndarray, channels: Sequence[int] | None, n_out: int
) -> np.ndarray:
    """Pick the network input channels of an (H, W, C) image; returns float32 (H, W, n_out).

    channels=None (cellpose 4): the first `n_out` channels, missing ones zero (a grayscale image
    becomes [img, 0, ...]).
    channels=[c1, c2] (cellpose 1-3 convention): c1 = channel to segment (0 = grayscale, the mean
    over channels; 1..C = that channel), c2 = optional nuclear channel (0 = none; 1..C). The pair
    [c1, c2] is then placed first and zeros fill up to `n_out` (extra channels are dropped).
    A single-channel image is used as is, whatever `channels` says (as cellpose 3).
    """
    if image.ndim != 3:
        raise ValueError(f"select_channels expects (H, W, C), got shape {image.shape}")
    nchan = image.shape[-1]
    if channels is None or nchan == 1:
        picked = image[..., : min(nchan, n_out)].astype(np.float32)
    else:
        if len(channels) != 2:
            raise ValueError(f"channels must be [channel to segment, nuclear channel], got {list(channels)}")
        c1, c2 = (int(c) for c in channels)
        for name, c in (("channel to segment", c1), ("nuclear channel", c2)):
            if not 0 <= c <= nchan:
                raise ValueError(f"{name} {c} is out of range for {nchan} image channels (0..{nchan})")
        data = image.astype(np.float32)
        if c1 == 0:
            # cellpose 3 ignores c2 when c1 = 0: grayscale is the mean over all channels.
            picked = data.mean(axis=-1, keepdims=True)
        else:
            picked = data[..., [c1 - 1] + ([c2 - 1] if c2 > 0 else [])]
        picked = picked[..., :n_out]
    if picked.shape[-1] < n_out:
        zeros = np.zeros((*picked.shape[:2], n_out - picked.shape[-1]), np.float32)
        picked = np.concatenate((picked, zeros), axis=-1)
    return np.ascontiguousarray(picked)


def channels_ignored(n_channels: int, channels: Sequence[int] | None) -> str | None:
    """Why `channels` ([channel to segment, nuclear channel]) does not apply to an image of `n_channels`
    channels (`select_channels` uses a single-channel image as is), in words; None when it applies."""
    if channels is None or n_channels != 1 or max(int(c) for c in channels) <= 1:
        return None
    return f"--channels {channels[0]} {channels[1]} ignored: the image has one channel"


def percentile_bounds(
    channel: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> tuple[np.floating, np.floating]:
    """(low, high) percentiles of a 2-D channel (linear interpolation, np.percentile), as numpy
    scalars of the channel's float dtype (float32 for float32 input, as cellpose computes them).

    Above 224**3 pixels the percentiles are taken on a strided subsample (step dim // 224 per
    axis), as cellpose does, so that huge images are normalized in bounded time.
    """
    steps = percentile_steps(channel.shape)
    sample = channel[tuple(slice(None, None, s) for s in steps)] if steps != (1,) * channel.ndim else channel
    return np.percentile(sample, lower), np.percentile(sample, upper)


def percentile_steps(shape: Sequence[int]) -> tuple[int, ...]:
    """The stride per axis of the pixels `percentile_bounds` takes its percentiles from: all ones up to
    224**3 pixels, else dim // 224 per axis (cellpose's subsample). Streamed readers
    (`cpsam.blockwise.percentiles`) gather exactly these pixels."""
    if math.prod(shape) <= PERCENTILE_SUBSAMPLE_ABOVE:
        return (1,) * len(shape)
    return tuple(max(1, n // PERCENTILE_SUBSAMPLE_STEP) for n in shape)


def normalize_percentile(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0, inplace: bool = False
) -> np.ndarray:
    """Scale each channel of an (H, W, C) image so its 1st/99th percentiles map to 0/1; float32.

    inplace=True overwrites a float32 `image` instead of copying it (saves one image of memory).

    No clipping. A channel with no contrast (max == min) or with a percentile range <= 1e-3 becomes
    all zeros (cellpose 4 semantics; cellpose 3 only differs for a constant non-zero channel).
    """
    if image.ndim != 3:
        raise ValueError(f"normalize_percentile expects (H, W, C), got shape {image.shape}")
    out = image if inplace and image.dtype == np.float32 else image.astype(np.float32, copy=True)
    bounds = [None if np.ptp(out[..., c]) <= 0 else percentile_bounds(out[..., c], lower, upper)
              for c in range(out.shape[-1])]
    return normalize_with_bounds(out, bounds, inplace=True)


def normalize_with_bounds(
    image: np.ndarray, bounds: Sequence[tuple[np.floating, np.floating] | None], inplace: bool = False
) -> np.ndarray:
    """Scale each channel c of an (H, W, C) image by given (low, high) = bounds[c]: (x - low) / (high - low),
    float32; a channel whose bounds are None (no contrast) or whose range is <= 1e-3 becomes all zeros.

    `normalize_percentile` is this with the image's own 1st/99th percentiles; blockwise segmentation passes
    the whole image's bounds so that every block is scaled as the whole image would be. Bounds should be
    numpy float32 scalars (as `percentile_bounds` returns for float32 channels) for cellpose's rounding.
    """
    if image.ndim != 3 or len(bounds) != image.shape[-1]:
        raise ValueError(f"normalize_with_bounds: {len(bounds)} channel bounds for an image of shape {image.shape}")
    out = image if inplace and image.dtype == np.float32 else image.astype(np.float32, copy=True)
    for c, bound in enumerate(bounds):
        channel = out[..., c]
        if bound is None:
            channel[...] = 0
            continue
        low, high = bound
        if high - low > 1e-3:
            # float32 scalars: the same rounding as cellpose (subtract, then divide).
            channel -= low
            channel /= high - low
        else:
            channel[...] = 0
    return out


def scaled_shape(height: int, width: int, rescale: float) -> tuple[int, int]:
    """(int(H * rescale), int(W * rescale)): the size the network sees.

    Raises ValueError when the rescale is not a positive finite number, when it leaves no pixels
    (diameter too large) or when the rescaled image would exceed MAX_SCALED_PIXELS (diameter too
    small: a 256 x 256 image at diameter 0.001 would need terabytes).
    """
    if not (math.isfinite(rescale) and rescale > 0):
        raise ValueError(f"cannot rescale a {height}x{width} image by {rescale} (the diameter must be positive)")
    shape = (int(height * rescale), int(width * rescale))
    if min(shape) < 1:
        raise ValueError(
            f"rescaling a {height}x{width} image by {rescale:.4g} leaves no pixels (diameter too large)"
        )
    if shape[0] * shape[1] > MAX_SCALED_PIXELS:
        raise ValueError(
            f"rescaling a {height}x{width} image by {rescale:.4g} would make it {shape[0]}x{shape[1]} pixels, "
            f"over the limit of {MAX_SCALED_PIXELS:,} (diameter too small for this image)"
        )
    return shape


def resize_image(
    image: np.ndarray, height: int, width: int, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float image to (height, width[, C]) with OpenCV (bilinear default).

    All channels go through one cv2.resize call, as cellpose does: OpenCV's result for an
    interleaved C-channel image differs in the last digits from resizing channel by channel.
    """
    if image.shape[:2] == (height, width):
        return image
    out = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)
    return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out


def get_pad_yx(height: int, width: int, tile_size: int | None = None) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) before tiling.

    Each side gets 8 px plus half of what rounds the size up to a multiple of 16. With
    `tile_size` (cellpose 4 / CP-SAM) a side shorter than the tile is padded to exactly one tile
    (or size + 16 if that is larger); without it (cellpose 3 / CPnet) no minimum is imposed.
    """

    def pad(length: int) -> tuple[int, int]:
        if tile_size is None or length >= tile_size:
            total = int(PAD_DIV * np.ceil(length / PAD_DIV) - length)
        else:
            total = max(0, tile_size - length - PAD_EXTRA * PAD_DIV)
        base = PAD_EXTRA * PAD_DIV // 2
        return base + total // 2, base + total - total // 2

    return (*pad(height), *pad(width))


def tile_starts(length: int, tile_size: int, overlap: float = 0.1, augment: bool = False) -> np.ndarray:
    """Start offsets (int64) of the tiles along one axis of a padded image of `length` pixels.

    Without augmentation: one tile if length <= tile_size, else ceil((1 + 2 * overlap) * length /
    tile_size) tiles (overlap clipped to [0.05, 0.5]); with augmentation: max(2, ceil(2 * length /
    tile_size)) half-overlapping tiles. Starts are evenly spaced integers (linspace, truncated).
    Tiles are min(tile_size, length) long (augment: the image is first padded to tile_size).
    """
    if augment:
        length = max(length, tile_size)
        n = max(2, int(np.ceil(2.0 * length / tile_size)))
    else:
        overlap = min(0.5, max(0.05, overlap))
        n = 1 if length <= tile_size else int(np.ceil((1.0 + 2 * overlap) * length / tile_size))
    return np.linspace(0, length - min(tile_size, length), n).astype(np.int64)


def taper_1d(length: int) -> np.ndarray:
    """The 1-D sigmoid taper (float64, `length` values) whose outer product weights a tile.

    Defined on max(224, length) points as 1 / (1 + exp((|t - centre| - (size/2 - 20)) / 7.5)) and
    centre-cropped to `length` (cellpose's `_taper_mask` is the outer product of two of these).
    """
    size = max(TAPER_MIN_SIZE, length)
    t = np.arange(size)
    dist = np.abs(t - t.mean())
    full = 1.0 / (1.0 + np.exp((dist - (size / 2 - TAPER_MARGIN)) / TAPER_SLOPE))
    start = size // 2 - length // 2
    return full[start : start + length]


def blend_weight_1d(length: int, starts: np.ndarray, tile_len: int) -> np.ndarray:
    """Sum of the 1-D tapers of all tiles along one axis (float64, `length`).

    The 2-D weight of a tile grid is separable, so the normalizer sum_tiles(mask) equals the outer
    product of the two 1-D sums: no full-image weight array is needed.
    """
    total = np.zeros(length, np.float64)
    taper = taper_1d(tile_len)
    for s in starts:
        total[s : s + tile_len] += taper
    return total


def flip_pattern(row: int, col: int) -> tuple[bool, bool]:
    """(flip Y, flip X) of tile (row, col) under test-time augmentation (cellpose's pattern).

    Even row / odd column: Y; odd row / even column: X; both odd: both; both even: none.
    """
    return col % 2 == 1, row % 2 == 1


def unflip_output(y: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    """Undo a tile flip on a (3, h, w) or (B, 3, h, w) output [dY, dX, cellprob]: flip back and negate
    the flow component along each flipped axis."""
    dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
    if not dims:
        return y
    y = torch.flip(y, dims)
    sign = torch.ones(y.shape[-3], dtype=y.dtype, device=y.device)
    if flip_y:
        sign[0] = -1
    if flip_x:
        sign[1] = -1
    return y * sign[:, None, None]
