"""Writes that never leave a half-written file: a temporary hidden file beside the target, renamed onto it only
when complete, removed on any failure (KeyboardInterrupt and `cpsam.io.signals.Terminated` included); and the
checks that an output folder or file can be written before any work starts.

Temporary names are `.STEM.XXXXXXXX.part.SUFFIX` (8 hex digits), created with the umask's usual mode (0644
under umask 022). A name is recorded before its file exists, so an interruption at any point leaves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from cpsam.io.errors import OutputPathError, describe_os_error

_TEMP_MARK = ".part"


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
