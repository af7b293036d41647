"""The whole image's normalization, streamed once over its tiles, equal to what the in-memory run computes.

`cpsam.segment.Segmenter` normalizes each network input channel by its 1st / 99th percentiles
(`cpsam.transforms.normalize_percentile`): of every pixel up to 224**3 pixels, else of the strided subsample
`cpsam.transforms.percentile_steps` picks; a channel without contrast (max == min) becomes zeros. Here each tile
contributes its channels' min and max and exactly the pixels of that subsample which fall inside it (after the
same channel selection, `cpsam.transforms.select_channels`, so values are the same float32 numbers). The
percentiles of the gathered pixels are then computed by `cpsam.transforms.percentile_bounds` itself: they are
the in-memory bounds exactly, not an approximation (the percentile of a set does not depend on the order its
values were gathered in). What is gathered is at most 224**3 values per channel (45 MiB of float32), whatever
the image size: above that size the subsample has about 224 x 224 values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cpsam import transforms
from cpsam.blockwise.source import ImageSource

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1


@dataclass(frozen=True)
class Normalization:
    """Per network input channel, the (low, high) intensities mapped to 0 / 1, or None for a channel without
    contrast; the values are float32 numbers (held as Python floats, which represent them exactly)."""

    bounds: tuple[tuple[float, float] | None, ...]

    def for_segmenter(self) -> list[tuple[np.float32, np.float32] | None]:
        """The bounds as `Segmenter.segment(normalization=...)` takes them (float32 scalars, cellpose's rounding)."""
        return [None if b is None else (np.float32(b[0]), np.float32(b[1])) for b in self.bounds]

    def to_json(self) -> list[list[float] | None]:
        return [None if b is None else [b[0], b[1]] for b in self.bounds]

    @classmethod
    def from_json(cls, value: Sequence[Sequence[float] | None]) -> Normalization:
        return cls(tuple(None if b is None else (float(b[0]), float(b[1])) for b in value))


@dataclass
class TileStats:
    """What one tile contributes: per channel min, max (float32) and the subsample pixels inside it."""

    minimum: np.ndarray
    maximum: np.ndarray
    samples: list[np.ndarray]


def tile_stats(source: ImageSource, rect: Rect, channels: Sequence[int] | None, n_inputs: int) -> TileStats:
    """Min, max and subsample pixels of one tile of `source` (rect = y0, y1, x0, x1) for `n_inputs` network
    channels selected by `channels` (`cpsam.transforms.select_channels`)."""
    y0, y1, x0, x1 = rect
    sy, sx = transforms.percentile_steps(source.shape)
    x = transforms.select_channels(transforms.to_channels_last(source.read(y0, y1, x0, x1)), channels, n_inputs)
    picked = x[(-y0) % sy :: sy, (-x0) % sx :: sx]
    return TileStats(
        minimum=x.min(axis=(0, 1)), maximum=x.max(axis=(0, 1)),
        samples=[np.ascontiguousarray(picked[..., c]).ravel() for c in range(n_inputs)],
    )


def combine(stats: Iterable[TileStats], n_inputs: int, lower: float = 1.0, upper: float = 99.0) -> Normalization:
    """The whole image's bounds from the stats of tiles that cover it exactly once."""
    minimum = np.full(n_inputs, np.inf, np.float32)
    maximum = np.full(n_inputs, -np.inf, np.float32)
    samples: list[list[np.ndarray]] = [[] for _ in range(n_inputs)]
    for tile in stats:
        minimum, maximum = np.minimum(minimum, tile.minimum), np.maximum(maximum, tile.maximum)
        for c in range(n_inputs):
            samples[c].append(tile.samples[c])
    bounds: list[tuple[float, float] | None] = []
    for c in range(n_inputs):
        if not maximum[c] - minimum[c] > 0:  # np.ptp(channel) <= 0 in normalize_percentile
            bounds.append(None)
            continue
        low, high = transforms.percentile_bounds(np.concatenate(samples[c]), lower, upper)
        bounds.append((float(low), float(high)))
        samples[c] = []
    return Normalization(tuple(bounds))


def whole_image_normalization(
    source: ImageSource,
    tiles: Sequence[Rect],
    channels: Sequence[int] | None,
    n_inputs: int,
    map_tiles: Callable[[Callable[[Rect], TileStats], Sequence[Rect]], Iterable[TileStats]] | None = None,
) -> Normalization:
    """One pass over `tiles` (which must cover the image exactly once): the bounds the in-memory run uses.

    map_tiles runs the per-tile function over the tiles (default: the builtin map in this process;
    `cpsam.blockwise.run` maps them on dask workers)."""

    def one(rect: Rect) -> TileStats:
        return tile_stats(source, rect, channels, n_inputs)

    mapper = map_tiles if map_tiles is not None else map
    return combine(mapper(one, tiles), n_inputs)
