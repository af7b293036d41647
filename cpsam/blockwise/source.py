"""Lazy readers of one large 2-D image (with optional channels): a zarr / OME-Zarr array or a TIFF.

`open_source(path)` checks the file and returns an `ImageSource`, a small picklable description (path, which
array, which axes) that dask workers open again on their side; `source.read(y0, y1, x0, x1)` reads one
rectangle as a numpy array, (h, w) or (h, w, C) channels last, without touching the rest of the image.

Formats:
- zarr (a folder NAME.zarr, zarr v2 or v3 format): an array, or a group holding one. An OME-Zarr group
  (`multiscales` in its attributes, OME-NGFF 0.4, or under `ome` in 0.5) is read at its full resolution
  (datasets[0]); its axes say which is the channel axis ("c" / type "channel").
- TIFF (.tif / .tiff, also BigTIFF, tiled or striped, compressed or not): read through tifffile's zarr store
  (`tifffile.imread(path, aszarr=True)`), which decodes only the tiles / strips a rectangle touches; the
  first series at full resolution. tifffile's axes letters say which is the channel axis (C or S).

Axes of length 1 (T, Z, a single channel, ...) are dropped; what is left must be Y, X and at most one channel
axis, else `SourceError` ("not 2-D"). Without axis names (a plain zarr array) a 3-D array's channel axis is
guessed as `cpsam.transforms.to_channels_last` does (axis 0 if shape[0] < shape[-1], else the last), unless
`channel_axis` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)


class SourceError(ValueError):
    """An input that cannot be read blockwise: unknown format, not 2-D, unreadable (the message says which)."""


@dataclass(frozen=True)
class ImageSource:
    """A large image read rectangle by rectangle.

    Attributes:
        path: the zarr folder or TIFF file.
        kind: "zarr" or "tiff".
        array_path: the array inside a zarr group ("" for the root array; "0" for TIFF level 0 when the TIFF
            store is a group).
        full_shape: the stored array's shape.
        y_axis, x_axis: the stored axes that are Y and X.
        channel_axis: the stored axis holding channels (None: grayscale).
        dtype: the stored pixel type (numpy dtype string).
    """

    path: Path
    kind: str
    array_path: str
    full_shape: tuple[int, ...]
    y_axis: int
    x_axis: int
    channel_axis: int | None
    dtype: str
    _array: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.full_shape[self.y_axis], self.full_shape[self.x_axis]

    @property
    def n_channels(self) -> int:
        """Number of channels (1 for a grayscale image)."""
        return 1 if self.channel_axis is None else self.full_shape[self.channel_axis]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = []  # open file handles stay in their process; a worker reopens the file
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def array(self) -> Any:
        """The zarr array (opened once per process and cached)."""
        if not self._array:
            self._array.append(_open_array(self.path, self.kind, self.array_path))
        return self._array[0]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] as (h, w) for grayscale or (h, w, C) channels last, in the stored dtype."""
        index: list[Any] = [0] * len(self.full_shape)
        index[self.y_axis], index[self.x_axis] = slice(y0, y1), slice(x0, x1)
        keep = [self.y_axis, self.x_axis]
        if self.channel_axis is not None:
            index[self.channel_axis] = slice(None)
            keep.append(self.channel_axis)
        data = np.asarray(self.array()[tuple(index)])
        # integer indices dropped the other axes; the kept ones are in stored order: sort them to Y, X, C
        order = sorted(keep)
        return np.ascontiguousarray(np.transpose(data, [order.index(a) for a in keep]))


def _open_array(path: Path, kind: str, array_path: str) -> Any:
    import zarr  # here, not at the top: zarr is only needed by blockwise runs (CLI start-up time)

    if kind == "tiff":
        import tifffile  # only for TIFF inputs

        node = zarr.open(tifffile.imread(path, aszarr=True, series=0), mode="r")
    else:
        node = zarr.open(str(path), mode="r")
    return node[array_path] if array_path else node


def _ome_axes(attrs: dict[str, Any]) -> tuple[str, list[str] | None] | None:
    """(full-resolution dataset path, axis names) of an OME-Zarr group's attributes, or None."""
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        return None
    first = multiscales[0]
    axes = first.get("axes")
    names = None
    if axes:
        names = []
        for axis in axes:
            if isinstance(axis, dict):
                kind = axis.get("type")
                names.append("c" if kind == "channel" else str(axis.get("name", "")).lower())
            else:
                names.append(str(axis).lower())
    return str(first["datasets"][0]["path"]), names


def _axes_from_names(shape: tuple[int, ...], names: list[str] | None, channel_axis: int | None,
                     where: str) -> tuple[int, int, int | None]:
    """(y_axis, x_axis, channel_axis) of a stored array: from axis names when known, else by rule."""
    if names is not None and len(names) == len(shape):
        names = [n.lower() for n in names]
        if "y" in names and "x" in names:
            y, x = names.index("y"), names.index("x")
            chan = next((i for i, n in enumerate(names) if n in ("c", "s") and shape[i] > 1), None)
            if channel_axis is not None:
                chan = channel_axis % len(shape)
            others = [i for i in range(len(shape)) if i not in (y, x, chan) and shape[i] > 1]
            if chan is None and len(others) == 1:  # one unnamed extra axis (tifffile's Q, I): the channels
                chan, others = others[0], []
            if others:
                raise SourceError(f"{where}: not 2-D: axes {''.join(names).upper()} of shape {shape} have more "
                                  "than Y, X and channels (blockwise segmentation takes one 2-D plane)")
            return y, x, chan
    big = [i for i, n in enumerate(shape) if n > 1]
    if len(big) == 2:
        return big[0], big[1], None
    if len(big) != 3:
        raise SourceError(f"{where}: not 2-D: shape {shape} (expected H x W, or H x W with one channel axis)")
    if channel_axis is not None:
        chan = channel_axis % len(shape)
        if chan not in big:
            raise SourceError(f"{where}: --channel-axis {channel_axis} is not one of the image's axes {shape}")
    else:
        chan = big[0] if shape[big[0]] < shape[big[-1]] else big[-1]
    y, x = (i for i in big if i != chan)
    return y, x, chan


def open_source(path: str | Path, channel_axis: int | None = None) -> ImageSource:
    """Describe a zarr / OME-Zarr array or a TIFF for reading by rectangles (see the module docstring).

    Raises SourceError naming the file and the problem: missing, unknown format (not .zarr / .tif / .tiff),
    unreadable, not 2-D (with optional channels), or not a numeric pixel type.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if suffix in TIFF_SUFFIXES:
        kind = "tiff"
    elif suffix in ZARR_SUFFIXES or (path.is_dir() and any((path / n).exists() for n in
                                                           ("zarr.json", ".zarray", ".zgroup"))):
        kind = "zarr"
    else:
        raise SourceError(f"{path}: unknown format (blockwise reads a zarr / OME-Zarr folder or a .tif / .tiff file)")
    names: list[str] | None = None
    array_path = ""
    try:
        if kind == "tiff":
            import tifffile  # only for TIFF inputs

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                names = list(series.axes.lower())
                store = series.aszarr()
                try:
                    import zarr  # only for blockwise runs

                    node = zarr.open(store, mode="r")
                    array_path = "" if hasattr(node, "shape") else "0"
                finally:
                    store.close()
        else:
            import zarr  # only for blockwise runs

            node = zarr.open(str(path), mode="r")
            if not hasattr(node, "shape"):  # a group: OME-Zarr, or a group holding one array
                ome = _ome_axes(dict(node.attrs))
                if ome is not None:
                    array_path, names = ome
                else:
                    arrays = sorted(name for name, _ in node.arrays())
                    if len(arrays) != 1:
                        raise SourceError(f"{path}: a zarr group with {len(arrays)} arrays and no OME-Zarr "
                                          "multiscales (give the array's own folder)")
                    array_path = arrays[0]
        array = _open_array(path, kind, array_path)
        shape, dtype = tuple(int(n) for n in array.shape), np.dtype(array.dtype)
    except SourceError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read it as {kind} ({type(exc).__name__}: {exc})") from exc
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype.kind == "b"):
        raise SourceError(f"{path}: unsupported pixel type {dtype} (expected integers or floats)")
    y, x, chan = _axes_from_names(shape, names, channel_axis, str(path))
    if shape[y] < 1 or shape[x] < 1:
        raise SourceError(f"{path}: the image has no pixels (shape {shape})")
    return ImageSource(path=path, kind=kind, array_path=array_path, full_shape=shape, y_axis=y, x_axis=x,
                       channel_axis=chan, dtype=dtype.str)
