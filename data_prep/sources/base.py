"""What every source converter shares: the Source description, the Item of work, layout checks.

A converter is a `Source` subclass with class attributes describing the dataset (license, size,
download URLs with checksums or manual instructions, the raw layout it expects) and two methods:

    items(raw)        -> list[Item]       cheap listing of the examples in the raw folder
    load(raw, item)   -> Example          the image, instance labels (and optional ignore mask)

`load` runs in worker processes, so Sources and Items must be picklable (module-level classes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cpsam.io import InputFileError


class LayoutError(InputFileError):
    """The raw folder does not have the documented layout; the message names the missing file."""


@dataclass(frozen=True)
class Download:
    """One downloadable file: URL, file name to save as, sha256 (None = unknown)."""

    url: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class Item:
    """One example to convert: unique `name` (no dataset prefix), `split`, and picklable `ref`s."""

    name: str
    split: str
    ref: tuple[Any, ...] = ()
    source: str = ""  # raw path(s) relative to the raw folder, for the index


@dataclass
class Example:
    """A loaded example: image (H, W), (C, H, W) or (H, W, C); labels (H, W); optional ignore (H, W)."""

    image: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Source:
    """Base class of a dataset converter (see module docstring)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    license: ClassVar[str] = "unknown"
    size: ClassVar[str] = "unknown"
    homepage: ClassVar[str] = ""
    downloads: ClassVar[tuple[Download, ...]] = ()
    manual: ClassVar[str] = ""  # non-empty: registration/manual download needed, exact steps
    layout: ClassVar[str] = ""  # the raw layout `items` expects (shown by `cpsam prep list -v`)
    channel_names: ClassVar[str] = ""

    def items(self, raw: Path) -> list[Item]:
        raise NotImplementedError

    def load(self, raw: Path, item: Item) -> Example:
        raise NotImplementedError

    def describe(self) -> str:
        """Multi-line human description: license, size, how to obtain, layout."""
        how = self.manual or "\n".join(f"  {d.url}" for d in self.downloads) or "  (no public URL)"
        return (
            f"{self.name}: {self.title}\n license: {self.license}\n size: {self.size}\n"
            f" homepage: {self.homepage}\n obtain:\n{how}\n layout expected by `convert --raw DIR`:\n"
            + "\n".join(f"  {line}" for line in self.layout.strip().splitlines())
        )


def require(path: Path, what: str = "") -> Path:
    """Return `path` if it exists, else raise LayoutError naming it (and what it should hold)."""
    if not path.exists():
        raise LayoutError(path, f"missing{(' (' + what + ')') if what else ''}; see `cpsam prep list -v`")
    return path


def find_dir(raw: Path, *candidates: str, what: str = "") -> Path:
    """The first existing folder among raw/candidate (glob patterns allowed); LayoutError if none."""
    for cand in candidates:
        hits = sorted(p for p in raw.glob(cand) if p.is_dir())
        if hits:
            return hits[0]
    raise LayoutError(
        raw / candidates[0],
        f"missing folder{(' (' + what + ')') if what else ''}; looked for {list(candidates)} under {raw}",
    )


def sorted_files(folder: Path, patterns: tuple[str, ...], *, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files in `folder` matching any glob pattern, minus names ending with an `exclude` suffix,
    skipping hidden and macOS metadata files; sorted by path."""
    out = set()
    for pat in patterns:
        for p in folder.glob(pat):
            if p.is_file() and not p.name.startswith(".") and "__MACOSX" not in p.parts:
                if not any(p.name.endswith(e) for e in exclude):
                    out.add(p)
    return sorted(out)


def hash_split(key: str, *, val: float = 0.1, test: float = 0.0) -> str:
    """Deterministic split for sources without an official one: sha1 of `key` mapped to [0, 1).

    Use a key that groups near-duplicates (a slide, a movie), never a single frame or crop.
    """
    u = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test else "val" if u < test + val else "train"


def safe_name(*parts: str) -> str:
    """File-system-safe example name joined from parts (spaces and separators become '_')."""
    name = "_".join(p for p in parts if p)
    for ch in " /\\:()[]{},;'\"":
        name = name.replace(ch, "_")
    while "__" in name:
        name = name.replace("__", "_")
    return name.strip("_.")


def rel(path: Path, raw: Path) -> str:
    """`path` relative to `raw` as a POSIX string (for the index `source` column)."""
    try:
        return Path(os.path.relpath(path, raw)).as_posix()
    except ValueError:
        return str(path)
