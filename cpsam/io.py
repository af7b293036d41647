"""Read and write images and label masks without ever leaving a half-written file.

Every reader raises `InputFileError` (a ValueError) that names the file and the problem, so the
command line can report it per file and move on. Every writer goes through `atomic_path` (or
`atomic_paths` for a set of files that belong together): a temporary hidden file beside the target,
renamed onto it only when complete, removed on any failure (also on SIGTERM inside
`terminate_as_interrupt`). Files get the usual mode of the umask (0644 under umask 022).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
# errno values that mean "nothing more can be written here": stop instead of failing file after file
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_TEMP_MARK = ".part"


class InputFileError(ValueError):
    """A file that cannot be used as input; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # picklable, so the error crosses process-pool boundaries (e.g. dynamics.write_flow_cache)
        return (type(self), (str(self.path), self.problem))


class OutputPathError(Exception):
    """An output location that cannot be written (a file where a folder is needed, read-only, full)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- atomic writes


def _temp_path_for(final: Path) -> Path:
    """A fresh hidden temporary name beside `final` that keeps its suffix (writers look at it)."""
    return final.with_name(f".{final.stem}.{secrets.token_hex(4)}{_TEMP_MARK}{final.suffix}")


def _create_temp(final: Path, temps: list[Path]) -> None:
    """Create an empty temporary file beside `final` (mode 0666 minus the umask, not mkstemp's 0600)
    and append its path to `temps`.

    The name goes into `temps` before the file exists, so an interruption (Ctrl-C, SIGTERM) that lands
    between creating the file and returning still leaves its name for the caller to remove.
    """
    for _ in range(100):
        temps.append(_temp_path_for(final))
        try:
            fd = os.open(temps[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            temps.pop()  # someone else's file (a 2^-32 chance): not ours to remove
            continue
        os.close(fd)
        return
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def stale_temp_files(final: str | os.PathLike[str]) -> list[Path]:
    """Temporary files that `atomic_path(final)` left behind when its process was killed (SIGKILL)."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.stem)}\.[A-Za-z0-9_]{{8}}{re.escape(_TEMP_MARK + final.suffix)}")
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    return sorted(final.parent / n for n in names if pattern.fullmatch(n))


def _with_path(exc: OSError, path: Path) -> OSError:
    """`exc` itself when it names a file, else the same error naming `path` (e.g. ENOSPC from a write)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file keeps the final suffix (writers such as tifffile and cv2 look at it) and has
    the umask's usual mode. On any exception (KeyboardInterrupt and `Terminated` included) the
    temporary file is removed, so no partial output is ever left; an OSError that names no file is
    re-raised naming `path`.
    """
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Like `atomic_path` for a set of files that belong together (e.g. a report and its tables).

    Yields one temporary path per target; only when the whole block succeeds are they renamed, one
    after the other, onto their targets. On any failure in the block no target is touched and every
    temporary is removed; if a rename itself fails, the targets already renamed are removed too.
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    renamed: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            _create_temp(final, temps)
        yield list(temps)
        for tmp, final in zip(temps, finals, strict=True):
            renamed.append(final)  # before the rename: an interruption right after it still removes the set
            try:
                os.replace(tmp, final)
            except OSError:
                renamed.pop()  # not replaced: the old file there is not ours to remove
                raise
    except BaseException as exc:
        # a rename that fails half-way (rare: full directory) removes the new files already in place,
        # so the set is never left partial
        for path in [*temps, *(renamed if len(finals) > 1 else [])]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            named = _with_path(exc, finals[0] if len(finals) == 1 else finals[0].parent)
            if named is not exc:
                raise named from exc
        raise


def is_storage_error(exc: BaseException) -> bool:
    """True for errors after which no further file can be written there (disk full, quota, read-only)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """'PATH: no space left on device' style text for an OSError (the path when it names one)."""
    what = (exc.strerror or str(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    return f"{exc.filename}: {what}" if exc.filename else what


def check_output_dir(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` (and its parents) if needed and prove it writable by creating and removing a
    temporary file in it. Raises OutputPathError saying what is wrong (a file, read-only, full...)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(folder, "exists and is not a folder") from None
    except NotADirectoryError:
        raise OutputPathError(folder, "cannot be created: part of its path is a file, not a folder") from None
    except OSError as exc:
        raise OutputPathError(folder, f"cannot be created ({describe_os_error(exc)})") from None
    if not folder.is_dir():
        raise OutputPathError(folder, "exists and is not a folder")
    try:
        probes: list[Path] = []
        try:
            _create_temp(folder / ".cpsam-write-check", probes)
            probes[0].write_bytes(b"cpsam")
        finally:
            for probe in probes:
                probe.unlink(missing_ok=True)
    except OSError as exc:
        reason = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "not writable"
        raise OutputPathError(folder, f"{reason} ({(exc.strerror or str(exc)).lower()})") from None
    return folder


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Check that the file `path` can be written: not a folder, its folder writable (see check_output_dir)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, "is a folder; give a file name inside it")
    check_output_dir(path.parent)
    return path


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into an exception (see `terminate_as_interrupt`)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (Slurm time limit, `docker stop`, `kill`) and SIGHUP raise `Terminated`
    in the main thread, like Ctrl-C raises KeyboardInterrupt, so that every `atomic_path` and output
    set being written is cleaned up. Only the first signal raises; a signal that was ignored (nohup)
    stays ignored. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's exit code for an interruption: 128 + the signal number (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))


def interrupt_name(exc: KeyboardInterrupt) -> str:
    """'SIGTERM', 'SIGHUP' or 'Ctrl-C' for an interruption."""
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"


# --------------------------------------------------------------------------- reading


def not_a_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None for a regular file (or a symbolic link to one); otherwise what `path` is instead:
    missing, a dangling or looping symbolic link, a folder, a FIFO, a socket, a device. Never opens it."""
    import stat

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


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """Silence tifffile's and OpenCV's own log lines while a file is decoded: a broken file gets one
    InputFileError line from us instead of decoder noise on stderr."""
    import logging

    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import cv2.utils.logging as cv2_logging

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
    """Write an (H, W, 3) uint8 RGB (or (H, W) grey) image as PNG, atomically.

    Encoded in memory and written as bytes, so a full disk reports its errno and the path.
    """
    import cv2

    array = np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the PNG (shape {array.shape}, {array.dtype})")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)
