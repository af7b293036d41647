"""The errors of cpsam.io: a file that cannot be used as input, an output location that cannot be written, and
how an OSError reads on one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno values that mean "nothing more can be written here": stop instead of failing file after file
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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


def is_storage_error(exc: BaseException) -> bool:
    """True for errors after which no further file can be written there (disk full, quota, read-only)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """'PATH: no space left on device' style text for an OSError (the path when it names one)."""
    what = (exc.strerror or str(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    return f"{exc.filename}: {what}" if exc.filename else what

