"""The block grid of a blockwise run: cores that tile the image, each read with a halo of overlap.

Block (iy, ix) owns the core rectangle [iy * B, min((iy + 1) * B, H)) x [ix * B, min((ix + 1) * B, W)) of
block size B; it is segmented on its outer rectangle, the core grown by `overlap` pixels on every side
(clipped to the image). Its labels are kept in the core only (`cpsam.blockwise.stitch`); the halo gives every
object that crosses a core's edge its full context in both blocks beside the seam, so that the two blocks'
versions of it can be matched. The overlap is at least 2 cell diameters (an object crossing a seam reaches at
most one diameter into the next core, so it lies wholly in both outer rectangles), and the block size at
least 4 diameters (`check_block_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)

OVERLAP_DIAMETERS = 2.0  # halo width in cell diameters
MIN_BLOCK_DIAMETERS = 4.0  # smallest block side in cell diameters


class BlockSizeError(ValueError):
    """A block size that cannot be used for this diameter or image."""


@dataclass(frozen=True)
class Block:
    """One block: its grid index, its core (what it writes) and outer rectangle (what it segments)."""

    index: tuple[int, int]
    core: Rect
    outer: Rect

    @property
    def name(self) -> str:
        """A stable name for files and zarr arrays: "IY_IX"."""
        return f"{self.index[0]}_{self.index[1]}"

    def core_in_outer(self) -> tuple[slice, slice]:
        """Slices of the core inside an array of the outer rectangle."""
        y0, y1, x0, x1 = self.core
        oy, _, ox, _ = self.outer
        return slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)


def overlap_for(diameter: float) -> int:
    """Halo width in pixels for a cell diameter in pixels: ceil(2 * diameter)."""
    return int(math.ceil(OVERLAP_DIAMETERS * diameter))


def check_block_size(block_size: int, diameter: float) -> None:
    """Raise BlockSizeError when the block is smaller than 4 diameters (or not positive)."""
    if block_size < 1:
        raise BlockSizeError(f"block size {block_size} px must be positive")
    if block_size < MIN_BLOCK_DIAMETERS * diameter:
        raise BlockSizeError(
            f"block size {block_size} px is smaller than {MIN_BLOCK_DIAMETERS:g} cell diameters "
            f"({MIN_BLOCK_DIAMETERS * diameter:.0f} px at diameter {diameter:.1f}); use a larger --block-size"
        )


def block_grid(shape: tuple[int, int], block_size: int, overlap: int) -> list[Block]:
    """The blocks of an (H, W) image in raster order (row by row)."""
    height, width = shape
    blocks = []
    for iy in range(math.ceil(height / block_size)):
        for ix in range(math.ceil(width / block_size)):
            y0, x0 = iy * block_size, ix * block_size
            y1, x1 = min(y0 + block_size, height), min(x0 + block_size, width)
            outer = (max(0, y0 - overlap), min(height, y1 + overlap), max(0, x0 - overlap), min(width, x1 + overlap))
            blocks.append(Block(index=(iy, ix), core=(y0, y1, x0, x1), outer=outer))
    return blocks


def intersection(a: Rect, b: Rect) -> Rect | None:
    """The overlap of two rectangles, or None when they do not overlap."""
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def neighbour_pairs(blocks: list[Block]) -> list[tuple[Block, Block]]:
    """Each pair of blocks that touch (by an edge or a corner) once, in raster order."""
    by_index = {b.index: b for b in blocks}
    pairs = []
    for block in blocks:
        iy, ix = block.index
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            other = by_index.get((iy + dy, ix + dx))
            if other is not None:
                pairs.append((block, other))
    return pairs
