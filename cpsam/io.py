"""Read and write images and label masks without ever leaving a half-written file.

Every reader raises `InputFileError` (a ValueError) that names the file and the problem, so the
command line can report it per file and move on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


class InputFileError(ValueError):
    """A file that cannot be used as input; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file keeps the final suffix (writers such as tifffile and cv2 look at it).
    On any exception the temporary file is removed, so no partial output is ever left.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".part{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2-D (H, W) or multi-channel image file as stored (any dtype, channel axis untouched).

    Supports TIFF (tifffile), NPY and the formats OpenCV reads (PNG/JPEG/BMP; colour returned RGB).
    Raises InputFileError for a missing, empty, unreadable or unsupported file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "file does not exist")
    if p.stat().st_size == 0:
        raise InputFileError(p, "file is empty (0 bytes)")
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            array = tifffile.imread(p)
        elif suffix == ".npy":
            array = np.load(p, allow_pickle=False)
        elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            import cv2

            array = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise ValueError("OpenCV could not decode it")
            if array.ndim == 3 and array.shape[2] in (3, 4):
                array = array[..., 2::-1] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
        else:
            raise InputFileError(p, f"unsupported file type {suffix!r} (expected one of {IMAGE_SUFFIXES})")
    except InputFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one clear message
        raise InputFileError(p, f"cannot be read as an image ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(array)


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2-D label image (H, W), integer dtype, 0 = background. Raises InputFileError otherwise."""
    labels = read_image(path)
    labels = np.squeeze(labels)
    if labels.ndim != 2:
        raise InputFileError(path, f"label image must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0) and labels.min() >= 0:
            labels = labels.astype(np.uint32)
        else:
            raise InputFileError(path, f"label image must hold integer ids, got dtype {labels.dtype}")
    return labels


def label_dtype(max_label: int) -> np.dtype:
    """uint16 for up to 65535 objects, else uint32 (what Cellpose writes)."""
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_tiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    compression: str | None = "zlib",
    photometric: str | None = None,
) -> Path:
    """Write `array` as a TIFF atomically (temporary name, then rename). Returns the final path.

    `photometric="minisblack"` stores a (C, H, W) array as C grey planes (tifffile otherwise
    guesses RGB for 3 uint8 planes).
    """
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, compression=compression, photometric=photometric)
    return Path(path)


def write_labels(path: str | os.PathLike[str], labels: np.ndarray) -> Path:
    """Write a (H, W) label image as uint16 (or uint32 above 65535 ids) TIFF, atomically."""
    labels = np.asarray(labels)
    max_label = int(labels.max()) if labels.size else 0
    return write_tiff(path, labels.astype(label_dtype(max_label), copy=False))
