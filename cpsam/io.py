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

    def __reduce__(self):
        # picklable, so the error crosses process-pool boundaries (e.g. dynamics.write_flow_cache)
        return (type(self), (str(self.path), self.problem))


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


# --------------------------------------------------------------------------- segmentation outputs


def masks_to_outlines(masks: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (H, W) label image: bool (H, W).

    A pixel of mask k is on its outline when one of its 4 neighbours is not k (another mask,
    background, or outside the image): the border points that cellpose's per-mask
    `cv2.findContours` traces for hole-free masks (what the dynamics produce).
    """
    masks = np.asarray(masks)
    padded = np.pad(masks, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(masks.shape, bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= neighbour != centre
    return edge & (masks > 0)


def _percentile_uint8(channel: np.ndarray) -> np.ndarray:
    """1st-99th percentile scaling of one (H, W) channel to uint8 (clipped), zeros for a flat channel."""
    from cpsam.transforms import normalize_percentile

    scaled = normalize_percentile(np.asarray(channel)[:, :, None])[..., 0]
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def flows_to_rgb(dP: np.ndarray) -> np.ndarray:
    """Colour wheel picture of (2, H, W) flows [dY, dX] -> uint8 (H, W, 3), as the cellpose GUI shows.

    Brightness is the flow magnitude scaled by its 1st/99th percentiles; hue is the flow angle
    (atan2(dX, dY)), mapped to three cosines 120 degrees apart.
    """
    from cpsam.transforms import normalize_percentile

    magnitude = np.sqrt(np.sum(np.asarray(dP, np.float32) ** 2, axis=0))
    brightness = 255 * np.clip(normalize_percentile(magnitude[:, :, None])[..., 0], 0, 1.0) / 2
    angle = np.arctan2(dP[1], dP[0]) + np.pi
    rgb = np.zeros((*magnitude.shape, 3), np.uint8)
    for c in range(3):
        rgb[..., c] = np.clip(brightness * (np.cos(angle + 2 * np.pi * c / 3) + 1), 0, 255).astype(np.uint8)
    return rgb


def seg_npy_dict(
    masks: np.ndarray,
    dP: np.ndarray,
    cellprob: np.ndarray,
    image_path: str | os.PathLike[str],
    *,
    channels: list[int] | None = None,
    diameter: float | None = None,
) -> dict:
    """The dict the cellpose GUI loads from NAME_seg.npy (keys of cellpose's masks_flows_to_seg).

    masks (H, W) labels; dP (2, H, W) float32 flows; cellprob (H, W) float32 logits.
    Keys: outlines (labels on boundary pixels), masks, chan_choose, ismanual, filename, diameter,
    flows = [flow colours (1, H, W, 3) uint8, cell probability (1, H, W) uint8, zeros (1, H, W, 3)
    uint8, [] (no final pixel positions), (3, H, W) float32 [dY, dX, cellprob]].
    """
    masks = np.asarray(masks)
    n = int(masks.max()) if masks.size else 0
    dtype = label_dtype(n)
    outlines = masks * masks_to_outlines(masks)
    rgb = flows_to_rgb(dP)
    flows = [
        rgb[np.newaxis],
        _percentile_uint8(cellprob)[np.newaxis],
        np.zeros((1, *rgb.shape), np.uint8),
        [],
        np.concatenate((np.asarray(dP, np.float32), np.asarray(cellprob, np.float32)[np.newaxis]), axis=0),
    ]
    return {
        "outlines": outlines.astype(dtype),
        "masks": masks.astype(dtype),
        "chan_choose": list(channels) if channels is not None else [0, 0],
        "ismanual": np.zeros(n, bool),
        "filename": str(image_path),
        "flows": flows,
        "diameter": float(diameter) if diameter else np.nan,
    }


def write_seg_npy(path: str | os.PathLike[str], seg: dict) -> Path:
    """Save a `seg_npy_dict` as a pickled .npy (what the cellpose GUI opens), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.array(seg, dtype=object), allow_pickle=True)
    return Path(path)


def display_rgb(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """An image as uint8 (H, W, 3) for overlays: grey for 1 channel, [c0, c1, 0] for 2, the first
    three channels otherwise; each channel scaled by its 1st/99th percentiles."""
    from cpsam.transforms import to_channels_last

    hwc = to_channels_last(np.asarray(image), channel_axis)
    planes = [_percentile_uint8(hwc[..., c]) for c in range(min(3, hwc.shape[-1]))]
    if len(planes) == 1:
        planes = planes * 3
    elif len(planes) == 2:
        planes.append(np.zeros_like(planes[0]))
    return np.stack(planes, axis=-1)


def outline_overlay(image: np.ndarray, masks: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
                    channel_axis: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3): the image (see `display_rgb`) with mask outlines painted in `color`."""
    rgb = display_rgb(image, channel_axis)
    if rgb.shape[:2] != masks.shape:
        raise ValueError(f"image {rgb.shape[:2]} and masks {masks.shape} differ in size")
    rgb[masks_to_outlines(masks)] = color
    return rgb


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB (or (H, W) grey) image as PNG, atomically."""
    import cv2

    array = np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array):
            raise OSError(f"{path}: OpenCV could not write the PNG")
    return Path(path)
