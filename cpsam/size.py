"""Diameter estimation as classic Cellpose (v1-v3) does it: a size model on the style vector.

A size model is a ridge regression from a network's (S,) style vector to the log cell diameter,
stored by cellpose as a pickled dict in a `.npy` file: `{'A': (S,), 'smean': (S,), 'diam_mean':
float, 'ymean': float}` (`size_cyto_A.npy` beside the 2020 cyto net, `size_cyto3.npy`, or
`MODEL_size.npy` beside a model file trained with `--train_size`). Estimation (cellpose 3.1's
`SizeModel.eval`) has two steps:

1. style estimate: diam_style = max(5, exp(A . (style - smean) + log(diam_mean) + ymean)), the
   style taken from a pass of the network at the model's own scale;
2. refinement: segment the image at diam_style and take the median mask diameter (the
   equivalent-circle diameter 2 sqrt(area / pi), `median_diameter`).

`cpsam.segment.Segmenter` runs both steps when it gets `diameter=None` and its model has a size
model, then segments at the refined diameter (cellpose 3's `Cellpose.eval` with diameter 0).

The files are pickles: `load_size_model` reads them through `cpsam.safe_npy`, whose unpickler only
builds numpy arrays, numpy scalars and plain containers, so a hostile file cannot run code (np.load
with allow_pickle=True would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import fastremap
import numpy as np

from cpsam.io import atomic_path
from cpsam.safe_npy import UnsafeOrInvalidNpy, load_npy_dict

MIN_DIAMETER = 5.0  # cellpose's floor of the style estimate, pixels


class SizeModelError(ValueError):
    """A size model file that cannot be read or does not hold a size model (the message names the file)."""


@dataclass(frozen=True)
class SizeModel:
    """A style -> diameter regression.

    Attributes:
        A: (S,) float regression weights on the centered style vector (float64 in cellpose's files).
        smean: (S,) float mean training style (float32 in cellpose's files).
        diam_mean: the model's mean diameter in pixels (the scale styles were taken at).
        ymean: mean of the training targets log(diameter) - log(diam_mean) (+ log of the crop scale).
    """

    A: np.ndarray
    smean: np.ndarray
    diam_mean: float
    ymean: float

    @property
    def style_channels(self) -> int:
        """Length S of the style vector this model expects."""
        return int(self.A.shape[0])

    def style_diameter(self, style: np.ndarray) -> float:
        """Diameter in pixels from one (S,) style vector (cellpose's `_size_estimation`), at least 5 px.

        A NaN or zero estimate (a blank image) falls back to diam_mean, as cellpose does.
        """
        style = np.asarray(style).reshape(-1)
        style = style if np.issubdtype(style.dtype, np.floating) else style.astype(np.float64)
        if style.shape != self.A.shape:
            raise ValueError(f"style has {style.size} values, the size model expects {self.style_channels}")
        estimate = float(np.exp(self.A @ (style - self.smean) + np.log(self.diam_mean) + self.ymean))
        estimate = max(MIN_DIAMETER, estimate)
        return self.diam_mean if (estimate == 0 or math.isnan(estimate)) else estimate

    def to_dict(self) -> dict:
        """The cellpose file layout: {'A', 'smean', 'diam_mean', 'ymean'}."""
        return {"A": self.A, "smean": self.smean, "diam_mean": float(self.diam_mean), "ymean": float(self.ymean)}

    def save(self, path: str | Path) -> Path:
        """Write the model as cellpose does (`np.save` of the dict; cellpose 3 loads it with
        `np.load(path, allow_pickle=True).item()`), atomically. Returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.array(self.to_dict(), dtype=object), allow_pickle=True)
        return path


def size_model_from_dict(params: dict, source: str = "size model") -> SizeModel:
    """Validate a cellpose size dict {'A', 'smean', 'diam_mean', 'ymean'} into a SizeModel."""
    missing = [k for k in ("A", "smean", "diam_mean", "ymean") if k not in params]
    if missing:
        raise SizeModelError(f"{source}: not a cellpose size model (missing {', '.join(missing)})")
    # kept in their stored dtypes (cellpose's smean is float32): the estimate then rounds as cellpose's
    a, smean = (np.asarray(params[k]).reshape(-1) for k in ("A", "smean"))
    if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(smean.dtype, np.floating)):
        raise SizeModelError(f"{source}: A and smean must be float vectors, got {a.dtype} and {smean.dtype}")
    diam_mean, ymean = float(np.asarray(params["diam_mean"])), float(np.asarray(params["ymean"]))
    if a.shape != smean.shape or a.size == 0:
        raise SizeModelError(f"{source}: A {a.shape} and smean {smean.shape} must be equal-length vectors")
    if not (np.isfinite(a).all() and np.isfinite(smean).all() and math.isfinite(ymean)) or not diam_mean > 0:
        raise SizeModelError(f"{source}: non-finite weights or diam_mean {diam_mean} <= 0")
    return SizeModel(A=a, smean=smean, diam_mean=diam_mean, ymean=ymean)


def load_size_model(path: str | Path) -> SizeModel:
    """Read a cellpose size model file (.npy holding the pickled dict). Raises SizeModelError naming
    the file when it is missing, unreadable, hostile (pickled code) or not a size model."""
    path = Path(path)
    try:
        params = load_npy_dict(path)
    except OSError as exc:
        raise SizeModelError(f"{path}: cannot read the size model ({exc.strerror or exc})") from exc
    except UnsafeOrInvalidNpy as exc:
        raise SizeModelError(f"not a cellpose size model file: {exc}") from exc
    return size_model_from_dict(params, source=str(path))


def size_model_candidates(model_path: str | Path) -> list[Path]:
    """Where cellpose keeps the size model of a model file: `MODEL_size.npy` (cellpose 2-3's
    `--train_size` and ours), then `size_STEM.npy` beside it (`size_cyto3.npy` for `cyto3`)."""
    model_path = Path(model_path)
    return [model_path.with_name(model_path.name + "_size.npy"), model_path.with_name(f"size_{model_path.stem}.npy")]


def find_size_model(model_path: str | Path) -> SizeModel | None:
    """The size model stored beside a model file (see `size_model_candidates`), or None."""
    for candidate in size_model_candidates(model_path):
        if candidate.is_file():
            return load_size_model(candidate)
    return None


def median_diameter(labels: np.ndarray) -> float:
    """Median over objects of the equivalent-circle diameter 2 sqrt(area / pi), in pixels
    (cellpose's `utils.diameters`); 0.0 for an image without objects. labels: (H, W) integers."""
    ids, counts = fastremap.unique(np.asarray(labels), return_counts=True)
    counts = counts[ids > 0]
    if counts.size == 0:
        return 0.0
    return float(np.median(np.sqrt(counts)) / (np.sqrt(np.pi) / 2))


__all__ = [
    "MIN_DIAMETER",
    "SizeModel",
    "SizeModelError",
    "find_size_model",
    "load_size_model",
    "median_diameter",
    "size_model_candidates",
    "size_model_from_dict",
]
