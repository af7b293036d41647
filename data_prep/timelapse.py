"""Time-lapse crops for the retraining workflow: N random frames x random K x K crops per stack.

Each crop gets a zero border of `border` pixels on every side (as drift-corrected movies have),
so a crop of size K becomes (K + 2*border) square. With mask stacks the crops form a canonical
dataset; without, the image crops are written as a plain folder to annotate (e.g. in the Cellpose
GUI) and convert afterwards with `cpsam prep convert seg_npy`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpsam.io import InputFileError, read_image, write_tiff
from data_prep.canonical import IndexRow, read_index, write_example, write_index
from data_prep.sources.base import safe_name


def _as_stack(stack: np.ndarray, path: Path) -> np.ndarray:
    """(T, H, W) or (T, C, H, W) from a stack; a (T, H, W, C<=4) stack becomes (T, C, H, W)."""
    if stack.ndim == 4 and stack.shape[-1] <= 4 and stack.shape[1] > 4:
        stack = np.moveaxis(stack, -1, 1)
    if stack.ndim not in (3, 4):
        raise InputFileError(
            path, f"expected a time-lapse stack (T, H, W) or (T, C, H, W), got {stack.shape}"
        )
    return stack


def crop_options_problem(*, frames: int, crop: int, border: int) -> str | None:
    """What is wrong with the sizes of a `timelapse_crops` call, naming the option (None when usable): at least
    one frame, a crop of at least one pixel that exceeds its two borders, no negative border."""
    if frames < 1:
        return f"--frames must be at least 1, got {frames}"
    if border < 0:
        return f"--border must be >= 0, got {border}"
    if crop < 1 or crop <= 2 * border:
        return f"--crop must exceed 2 x --border ({2 * border}) and be at least 1, got {crop}"
    return None


def crop_positions(
    n_frames: int, shape: tuple[int, int], *, frames: int, crop: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """`frames` distinct random frame indices, each with a random top-left (y, x) of a crop x crop box."""
    h, w = shape
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the frame {h}x{w}")
    chosen = np.sort(rng.choice(n_frames, size=min(frames, n_frames), replace=False))
    return [(int(t), int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))) for t in chosen]


def pad_border(array: np.ndarray, border: int) -> np.ndarray:
    """Zero-pad the last two axes by `border` pixels on each side."""
    pad = [(0, 0)] * (array.ndim - 2) + [(border, border), (border, border)]
    return np.pad(array, pad, mode="constant", constant_values=0)


def timelapse_crops(
    stacks: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    masks: Sequence[str | os.PathLike[str]] | None = None,
    frames: int = 5,
    crop: int = 100,
    border: int = 2,
    seed: int = 0,
    dataset: str = "timelapse",
    split: str = "train",
) -> list[IndexRow] | list[Path]:
    """Cut `frames` random crop x crop windows (one per random frame) from every stack.

    stacks: TIFF/NPY files (T, H, W) or (T, C, H, W). masks: matching (T, H, W) label stacks or None.
    The draw is deterministic in (seed, stack file name). A crop with NaN/Inf pixels is skipped with a warning
    on stderr naming the stack and frame; after a failure part-way the index still lists the crops written.
    Returns the index rows written (with masks) or the image paths written (without). Raises ValueError
    (naming the option) for sizes `crop_options_problem` refuses.
    """
    out = Path(out)
    problem = crop_options_problem(frames=frames, crop=crop, border=border)
    if problem is not None:
        raise ValueError(problem)
    if masks is not None and len(masks) != len(stacks):
        raise ValueError(f"{len(stacks)} stacks but {len(masks)} mask stacks")
    rows = {r.name: r for r in read_index(out)} if masks is not None else {}
    written: list = []
    try:
        _cut_stacks(stacks, out, masks, rows, written, frames=frames, crop=crop, border=border, seed=seed,
                    dataset=dataset, split=split)
    except BaseException:
        if masks is not None and rows:  # a failure part-way: the index still lists every example written
            write_index(out, rows.values())
        raise
    if masks is not None:
        write_index(out, rows.values())
    return written


def _cut_stacks(stacks: Sequence[str | os.PathLike[str]], out: Path, masks: Sequence[str | os.PathLike[str]] | None,
                rows: dict[str, IndexRow], written: list, *, frames: int, crop: int, border: int, seed: int,
                dataset: str, split: str) -> None:
    """The loop of `timelapse_crops`: appends to `written` and `rows` as each crop is written."""
    for k, sp in enumerate(stacks):
        sp = Path(sp)
        stack = _as_stack(read_image(sp), sp)
        mstack = None
        if masks is not None:
            mp = Path(masks[k])
            mstack = read_image(mp)
            if mstack.shape != (stack.shape[0], *stack.shape[-2:]):
                raise InputFileError(
                    mp, f"mask stack shape {mstack.shape} does not match image stack {stack.shape}"
                )
        low, high = float(stack.min()), float(stack.max())
        if border > 0 and low > 0.05 * high:
            # percentile normalization (cellpose's and ours) would take the zero border as the darkest 1 %
            print(f"warning: {sp}: every pixel is >= {low:g} (an offset?), so the zero border is far below the "
                  "image and will flatten it in normalization; subtract the background first or use --border 0",
                  file=sys.stderr)
        key = int(hashlib.sha1(sp.name.encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([seed, key])
        for t, y, x in crop_positions(stack.shape[0], stack.shape[-2:], frames=frames, crop=crop, rng=rng):
            window = stack[t, ..., y : y + crop, x : x + crop]
            if np.issubdtype(window.dtype, np.floating) and not np.isfinite(window).all():
                print(f"warning: {sp}: frame {t} has NaN/Inf pixels in the crop y={y}, x={x}; skipped",
                      file=sys.stderr)
                continue
            img = pad_border(window, border)
            name = safe_name(dataset, sp.stem, f"t{t:04d}_y{y}_x{x}")
            if mstack is None:
                written.append(write_tiff(out / f"{name}.tif", img))
                continue
            lab = pad_border(read_labels_array(mstack[t, y : y + crop, x : x + crop]), border)
            row = write_example(
                out,
                name,
                img,
                lab,
                dataset=dataset,
                split=split,
                license="yours",
                source=f"{sp.name}[t={t}, y={y}:{y + crop}, x={x}:{x + crop}]",
            )
            rows[name] = row
            written.append(row)


def read_labels_array(labels: np.ndarray) -> np.ndarray:
    """Labels of one frame as int64 (ids cut by the crop stay; renumbered on write)."""
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels)
    return labels.astype(np.int64)
