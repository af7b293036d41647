"""A rectangle of an image seen through the WHOLE image's resize and tile grid.

`Segmenter.segment_window` segments one rectangle (a block of an image larger than memory) so that its flows
equal those of the in-memory run over the whole image: the rectangle is resized on the whole image's resize
grid (the sampling positions of one `cv2.resize` of the whole image) and run through exactly the network tiles
of the whole image's tile grid that touch it, at their global positions (and, with augmentation, with their
global flip pattern). Flows then match the whole image's to float rounding inside the rectangle, whatever its
position, instead of depending on where the rectangle was cut.

Coordinates along one axis (all half-open [start, stop)):
- original: the image's pixels (0..H);
- resized: the network's scale (0..Hr, Hr = int(H * rescale) as `transforms.scaled_shape`);
- padded: resized + the whole image's top/left pad (`transforms.get_pad_yx`), where the tiles start.

The resize rule is OpenCV's INTER_LINEAR (cellpose's `resize_image`): output pixel d samples the source at
(d + 0.5) * src / dst - 0.5 (computed in float64; rounded to float32 for 2-channel images, as OpenCV does),
linearly between its floor and floor + 1, clamped at the image's edges. `resize_window` computes any window of
that resize from the source rows it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpsam import transforms

Span = tuple[int, int]


def linear_taps(src_len: int, dst_len: int, start: int, stop: int, float32_positions: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, frac) of output pixels start..stop of a src_len -> dst_len linear resize: output d is
    src[i0] * (1 - frac) + src[i1] * frac (int64, int64, float32), as OpenCV's INTER_LINEAR computes it
    (sampling positions in float64, or rounded to float32 as OpenCV does for 2-channel images); i1 = i0
    where frac is 0 (the pixel reads one source pixel)."""
    scale = 1.0 / (dst_len / src_len)  # cv2: scale_x = 1. / inv_scale_x
    pos = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5
    if float32_positions:
        pos = pos.astype(np.float32).astype(np.float64)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    low = i0 < 0
    i0[low], frac[low] = 0, 0.0
    high = i0 >= src_len - 1
    i0[high], frac[high] = src_len - 1, 0.0
    frac = frac.astype(np.float32)
    return i0, np.where(frac > 0, np.minimum(i0 + 1, src_len - 1), i0), frac


def source_span(src_len: int, dst_len: int, start: int, stop: int) -> Span:
    """The source pixels [lo, hi) that output pixels start..stop of a src_len -> dst_len resize read (under
    either precision of `linear_taps`' positions)."""
    taps = [linear_taps(src_len, dst_len, start, stop, single) for single in (False, True)]
    return min(int(t[0].min()) for t in taps), max(int(t[1].max()) for t in taps) + 1


def resize_window(x: np.ndarray, src_origin: tuple[int, int], src_shape: tuple[int, int],
                  dst_shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """The `window` (y0, y1, x0, x1) of the whole image's linear resize src_shape -> dst_shape, from `x`.

    x: (h, w) or (h, w, C) float32, the source rows/columns starting at `src_origin` (they must cover
    `source_span` of the window on each axis). Returns (y1 - y0, x1 - x0[, C]) float32, equal to
    `transforms.resize_image(whole, *dst_shape)[y0:y1, x0:x1]` to float rounding (1e-7 of the value range for
    1 or 2 channels; up to 3e-5 for 3 or more, where OpenCV's interleaved path rounds differently).
    """
    if tuple(src_shape) == tuple(dst_shape):
        (oy, ox), (y0, y1, x0, x1) = src_origin, window
        return x[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    extra = (None,) * (x.ndim - 2)
    # OpenCV (4.x, measured) rounds the sampling positions of 2-channel float images to float32, and keeps
    # them in float64 for 1 and 3 channels; copying that makes a 2-channel window equal to the last bit.
    single = x.ndim == 3 and x.shape[2] == 2
    r0, r1, fy = linear_taps(src_shape[0], dst_shape[0], window[0], window[1], single)
    c0, c1, fx = linear_taps(src_shape[1], dst_shape[1], window[2], window[3], single)
    r0, r1, c0, c1 = r0 - src_origin[0], r1 - src_origin[0], c0 - src_origin[1], c1 - src_origin[1]
    if min(r0.min(), c0.min()) < 0 or r1.max() >= x.shape[0] or c1.max() >= x.shape[1]:
        raise ValueError("resize_window: the source crop does not cover the window's taps")
    rows = np.unique(np.concatenate([r0, r1]))  # only the source rows the window reads
    x = x[rows]
    r0, r1 = np.searchsorted(rows, r0), np.searchsorted(rows, r1)
    wx = fx[(slice(None), *extra)]
    horizontal = x[:, c0] * (np.float32(1) - wx) + x[:, c1] * wx  # OpenCV: horizontal pass first
    wy = fy[(slice(None), None, *extra)]
    return (horizontal[r0] * (np.float32(1) - wy) + horizontal[r1] * wy).astype(np.float32, copy=False)


@dataclass(frozen=True)
class AxisPlan:
    """One axis of a window through the whole image's grid (see the module docstring for the coordinates).

    window: the original pixels asked for; resized: the resized pixels resizing back to `window` reads;
    source: the original pixels the network input needs (read from the image); input: the resized pixels
    placed into the network input; extent: the padded pixels the selected tiles cover; starts: the selected
    tiles' starts relative to extent[0]; first_tile: the global index of the first selected tile (the
    flip pattern's row / column); pad: the whole image's leading pad; full, scaled: original and resized
    lengths of the whole image; tile: tile length.
    """

    window: Span
    resized: Span
    source: Span
    input: Span
    extent: Span
    starts: np.ndarray
    first_tile: int
    pad: int
    full: int
    scaled: int
    tile: int


def plan_axis(full: int, scaled: int, pad: int, padded_len: int, tile: int, overlap: float, augment: bool,
              window: Span) -> AxisPlan:
    """Plan one axis: `full` original pixels resized to `scaled`, padded by `pad` in front to `padded_len`
    (the whole image's padded length, including augmentation's extra padding), tiles of `tile` pixels."""
    if not 0 <= window[0] < window[1] <= full:
        raise ValueError(f"window {window} is outside 0..{full}")
    resized = source_span(scaled, full, *window)
    all_starts = transforms.tile_starts(padded_len, tile, overlap, augment)
    tile_len = min(tile, padded_len)
    lo, hi = resized[0] + pad, resized[1] + pad
    picked = np.flatnonzero((all_starts < hi) & (all_starts + tile_len > lo))
    extent = int(all_starts[picked[0]]), int(all_starts[picked[-1]]) + tile_len
    inp = max(0, extent[0] - pad), min(scaled, extent[1] - pad)
    source = source_span(full, scaled, *inp)
    return AxisPlan(window=window, resized=resized, source=source, input=inp, extent=extent,
                    starts=all_starts[picked] - extent[0], first_tile=int(picked[0]), pad=pad, full=full,
                    scaled=scaled, tile=tile_len)


@dataclass(frozen=True)
class WindowPlan:
    """A 2-D window through the whole image's grid: one AxisPlan per axis."""

    y: AxisPlan
    x: AxisPlan

    @property
    def source(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): the original pixels to read."""
        return (*self.y.source, *self.x.source)


def plan_window(shape: tuple[int, int], window: tuple[int, int, int, int], scaled: tuple[int, int],
                tile: int, pad_to_tile: bool, overlap: float, augment: bool) -> WindowPlan:
    """Plan `window` (y0, y1, x0, x1) of an image of `shape` that the network sees at `scaled`, with the
    padding and tile rules of `Segmenter` (`transforms.get_pad_yx`, `transforms.tile_starts`)."""
    pads = transforms.get_pad_yx(*scaled, tile_size=tile if pad_to_tile else None)
    axes = []
    for axis in (0, 1):
        before, after = pads[2 * axis], pads[2 * axis + 1]
        length = scaled[axis] + before + after
        padded = length + (max(0, tile - length) if augment else 0)  # augmentation pads up to one tile
        axes.append(plan_axis(shape[axis], scaled[axis], before, padded, tile, overlap, augment,
                              (window[2 * axis], window[2 * axis + 1])))
    return WindowPlan(*axes)
