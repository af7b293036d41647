"""Cut large images of a canonical dataset into fixed-size tiles or per-cell windows, with masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from data_prep.canonical import CanonicalDataset, IndexRow, read_index, write_example, write_index
from data_prep.labels import count_objects, relabel_consecutive, remove_small


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of windows of `size` every `stride` px covering [0, length) (last one flush)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _crop(image: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    return image[..., y : y + size, x : x + size]


def _clean(labels: np.ndarray, min_size: int) -> np.ndarray:
    return relabel_consecutive(remove_small(labels, min_size))


def make_subimages(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mode: str = "tiles",
    size: int = 256,
    overlap: int = 0,
    min_objects: int = 1,
    min_size: int = 10,
    context: float = 2.0,
    split: str | None = None,
) -> list[IndexRow]:
    """Write subimages of every example of canonical dataset `root` as canonical dataset `out`.

    mode "tiles": size x size windows with `overlap` px overlap (images smaller than `size` are kept
    whole); windows with fewer than `min_objects` objects are skipped. mode "cells": one square window
    per object, centred on it, side = `context` x its larger bounding-box side (at least 16 px),
    holding every object inside it. Objects cut below `min_size` px by a window edge are removed.
    Names are `<name>_y<Y>_x<X>` (tiles) or `<name>_cell<ID>` (cells); dataset and split are kept.
    """
    if mode not in ("tiles", "cells"):
        raise ValueError(f"mode must be 'tiles' or 'cells', got {mode!r}")
    ds = CanonicalDataset(root, split=split)
    rows = {r.name: r for r in read_index(out)}
    new: list[IndexRow] = []
    for i, row in enumerate(ds):
        image, labels = ds.image(i), ds.mask(i)
        h, w = labels.shape
        windows: list[tuple[str, int, int, int]] = []
        if mode == "tiles":
            step = max(1, size - overlap)
            for y in tile_starts(h, size, step):
                for x in tile_starts(w, size, step):
                    windows.append((f"{row.name}_y{y}_x{x}", y, x, size))
        else:
            for obj, sl in enumerate(ndimage.find_objects(labels), start=1):
                if sl is None:
                    continue
                side = int(
                    min(max(16, context * max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)), h, w)
                )
                cy, cx = (sl[0].start + sl[0].stop) // 2, (sl[1].start + sl[1].stop) // 2
                y = int(np.clip(cy - side // 2, 0, h - side))
                x = int(np.clip(cx - side // 2, 0, w - side))
                windows.append((f"{row.name}_cell{obj}", y, x, side))
        for name, y, x, side in windows:
            lab = _clean(_crop(labels, y, x, side), min_size)
            if count_objects(lab) < min_objects:
                continue
            r = write_example(
                out,
                name,
                _crop(image, y, x, side),
                lab,
                dataset=row.dataset,
                split=row.split,
                license=row.license,
                source=f"{row.name}[y={y}:{y + side}, x={x}:{x + side}]",
                channel_names=row.channel_names,
            )
            rows[name] = r
            new.append(r)
    write_index(Path(out), rows.values())
    return new
