"""LyNSeC lymphoma nuclei (IHC + H&E): npy (H, W, 4) = RGB + instance map."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep.sources.base import Download, Example, Item, LayoutError, Source, hash_split, rel, sorted_files


class LyNSeC(Source):
    name = "lynsec"
    title = "LyNSeC lymphoma nuclei, IHC (lynsec 1) and H&E (lynsec 2, 3)"
    license = "CC BY 4.0"
    size = "~700 tiles 512x512"
    homepage = "https://zenodo.org/records/8065174"
    downloads = (
        Download(
            "https://zenodo.org/records/8065174/files/lynsec.zip",
            "lynsec.zip",
            "14b9b5a9c39cb41afc7f31de5a995cefff0947c215e14ab9c7a463f32fbbf4b6",
        ),
    )
    layout = """
    lynsec 1/*.npy, lynsec 2/*.npy, lynsec 3/*.npy: (H, W, 4) arrays, [..., :3] RGB, [..., 3] instance ids
    files 0_l2 .. 34_l2 have mismatching labels and are skipped (as torch-em does)
    no official split: 10% val by a hash of the file name
    """
    channel_names = "R,G,B"

    @staticmethod
    def _bad(path: Path) -> bool:
        m = re.fullmatch(r"(\d+)_l2", path.stem)
        return m is not None and int(m.group(1)) <= 34

    def items(self, raw: Path) -> list[Item]:
        files = [p for p in sorted_files(raw, ("lynsec */*.npy", "*/lynsec */*.npy")) if not self._bad(p)]
        if not files:
            raise LayoutError(raw / "lynsec 1", f"no LyNSeC npy files found; expected:\n{self.layout}")
        return [
            Item(name=p.stem, split=hash_split(p.stem), ref=(rel(p, raw),), source=rel(p, raw)) for p in files
        ]

    def load(self, raw: Path, item: Item) -> Example:
        path = raw / item.ref[0]
        arr = np.load(path)
        if arr.ndim != 3 or arr.shape[-1] < 4:
            raise LayoutError(path, f"expected an (H, W, 4) array, got {arr.shape}")
        image = np.clip(np.rint(arr[..., :3]), 0, 255).astype(np.uint8)
        return Example(image, np.rint(arr[..., 3]).astype(np.int64))
