"""Memory-mapped access to large .npy / .npz arrays so worker processes never load whole datasets."""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from cpsam.io import atomic_path
from data_prep.sources.base import LayoutError


@lru_cache(maxsize=8)
def open_npy(path: str) -> np.ndarray:
    """np.load(path, mmap_mode="r"), cached per process; LayoutError naming the file on failure."""
    p = Path(path)
    if not p.exists():
        raise LayoutError(p, "array file is missing")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays cannot be memory-mapped
        raise LayoutError(p, f"cannot memory-map ({exc})") from exc


def npz_member_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array `key` inside an .npz without reading its data."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = reader(fh)
            return tuple(shape)
    except KeyError as exc:
        raise LayoutError(path, f"array {key!r} is missing (has {zipfile.ZipFile(path).namelist()})") from exc
    except (zipfile.BadZipFile, ValueError) as exc:
        raise LayoutError(path, f"not a valid .npz file ({exc})") from exc


def extract_npz_member(path: Path, key: str, cache_dir: Path) -> Path:
    """Extract `key` of an .npz to cache_dir/<stem>.<key>.npy once (atomically) so it can be mmapped."""
    target = cache_dir / f"{path.stem}.{key}.npy"
    if target.exists() and target.stat().st_mtime >= path.stat().st_mtime:
        return target
    npz_member_shape(path, key)  # clear error if absent
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as src, atomic_path(target) as tmp:
        with open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return target
