"""Image and label files: read TIFF / PNG / JPEG / BMP / NPY as stored, write TIFF, label TIFF and PNG atomically.

Every reader raises `InputFileError` (a ValueError) that names the file and the problem, so the command line can
report it per file and move on; every writer goes through `cpsam.io.atomic.atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from cpsam.io.atomic import atomic_path
from cpsam.io.errors import InputFileError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


def not_a_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None for a regular file (or a symbolic link to one); otherwise what `path` is instead:
    missing, a dangling or looping symbolic link, a folder, a FIFO, a socket, a device. Never opens it."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if p.is_symlink():
            return f"dangling symbolic link (to {os.readlink(p)}, which does not exist)"
        return "file does not exist"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2-D (H, W) or multi-channel image file as stored (any dtype, channel axis untouched).

    Supports TIFF (tifffile), NPY and the formats OpenCV reads (PNG/JPEG/BMP; colour returned RGB).
    Raises InputFileError for a missing, empty, unreadable or unsupported file (and for anything
    that is not a regular file: a FIFO is never opened).
    """
    p = Path(path)
    problem = not_a_file_problem(p)
    if problem is not None:
        raise InputFileError(p, problem)
    if p.stat().st_size == 0:
        raise InputFileError(p, "file is empty (0 bytes)")
    suffix = p.suffix.lower()
    try:
        with _quiet_decoders():
            if suffix in (".tif", ".tiff"):
                array = tifffile.imread(p)
            elif suffix == ".npy":
                array = np.load(p, allow_pickle=False)
            elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
                import cv2  # only for PNG / JPEG / BMP (start-up time of every command)

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


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """Silence tifffile's and OpenCV's own log lines while a file is decoded: a broken file gets one
    InputFileError line from us instead of decoder noise on stderr."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import cv2.utils.logging as cv2_logging  # here: start-up time; some OpenCV builds lack it

        cv2_level = cv2_logging.getLogLevel()
        cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # an OpenCV build without its logging module
        cv2_logging = None
    try:
        yield
    finally:
        logger.setLevel(level)
        if cv2_logging is not None:
            cv2_logging.setLogLevel(cv2_level)


def squeeze_to_2d(array: np.ndarray) -> np.ndarray:
    """Drop length-1 axes only while more than two axes remain (leading ones first): (1, H, W) and
    (H, W, 1) become (H, W), while a 1 x 1 or 1 x N image keeps its two axes (np.squeeze would not)."""
    array = np.asarray(array)
    while array.ndim > 2 and 1 in array.shape:
        array = np.squeeze(array, axis=array.shape.index(1))
    return array


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2-D label image (H, W), integer dtype, 0 = background, no negative ids.

    Extra length-1 axes are dropped (`squeeze_to_2d`); whole-number float images become uint32.
    Raises InputFileError naming the file otherwise.
    """
    labels = squeeze_to_2d(read_image(path))
    if labels.size == 0:
        raise InputFileError(path, f"label image has no pixels (shape {labels.shape}): a corrupt or empty file")
    if labels.ndim != 2:
        raise InputFileError(path, f"label image must be 2-D, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating):
            raise InputFileError(path, f"label image must hold integer ids, got dtype {labels.dtype}")
        if not np.isfinite(labels).all():
            raise InputFileError(path, "label image contains NaN/Inf values (expected integer ids)")
        if not np.all(np.mod(labels, 1) == 0):
            raise InputFileError(path, f"label image must hold integer ids, got fractional {labels.dtype} values")
        if labels.max() > np.iinfo(np.uint32).max:
            raise InputFileError(path, f"label ids up to {labels.max():.0f} do not fit uint32")
    if not np.issubdtype(labels.dtype, np.unsignedinteger) and labels.min() < 0:
        raise InputFileError(path, f"label image has negative ids (min {labels.min():g}; 0 = background, 1..N objects)")
    return labels.astype(np.uint32) if np.issubdtype(labels.dtype, np.floating) else labels


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


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB (or (H, W) grey) image as PNG, atomically.

    Encoded in memory and written as bytes, so a full disk reports its errno and the path.
    """
    import cv2  # only when a PNG is written (start-up time of every command)

    array = np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the PNG (shape {array.shape}, {array.dtype})")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)
