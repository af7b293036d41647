"""Segmentation of images larger than memory: blocks with overlap, on dask.distributed, stitched into a zarr.

    from cpsam.blockwise import segment_blockwise
    result = segment_blockwise("cyto_0", "slide.ome.zarr", "slide_labels.zarr", diameter=17, workers=2)
    # labels: zarr.open("slide_labels.zarr")["labels"], (H, W) uint32, ids 1..result.n_objects

One concept per module:

    source.py       lazy readers: zarr / OME-Zarr arrays and TIFFs, read rectangle by rectangle
    percentiles.py  the whole image's normalization bounds, streamed once (equal to the in-memory ones)
    blocks.py       the block grid: cores, halos of 2 diameters, the 4-diameter minimum
    stitch.py       labels of overlapping blocks -> one label image with ids 1..N
    run.py          the dask run: per-worker model cache, block tasks, resume, stitch pass, BigTIFF
    cli.py          `cpsam segment --blockwise`
"""

from __future__ import annotations

from cpsam.blockwise.blocks import BlockSizeError
from cpsam.blockwise.run import DEFAULT_BLOCK_SIZE, BlockwiseResult, OutputExistsError, segment_blockwise, write_bigtiff
from cpsam.blockwise.source import ImageSource, SourceError, open_source

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockSizeError",
    "BlockwiseResult",
    "ImageSource",
    "OutputExistsError",
    "SourceError",
    "open_source",
    "segment_blockwise",
    "write_bigtiff",
]
