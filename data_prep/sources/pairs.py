"""Shared converter for sources that ship one instance label image per image file.

Subclasses set `roots` (folder glob under the raw folder -> split), image glob patterns, and how a
mask file is named from its image (`mask_for`). Images and masks are read with cpsam.io.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cpsam.io import read_image, read_labels
from data_prep.sources.base import (
    Example,
    Item,
    LayoutError,
    Source,
    hash_split,
    rel,
    safe_name,
    sorted_files,
)


class LabelPairSource(Source):
    """Images with a sibling instance-label file (see module docstring)."""

    roots: ClassVar[tuple[tuple[str, str], ...]] = ()  # (folder glob relative to raw, split or "hash")
    image_patterns: ClassVar[tuple[str, ...]] = ("*.tif", "*.tiff", "*.png")
    exclude: ClassVar[tuple[str, ...]] = ()
    recursive: ClassVar[bool] = False

    def mask_for(self, image: Path) -> Path:
        """Path of the label file of `image` (may not exist)."""
        raise NotImplementedError

    def split_key(self, image: Path, raw: Path) -> str:
        """Grouping key for sources without an official split (override to group by slide/movie)."""
        return rel(image, raw)

    def items(self, raw: Path) -> list[Item]:
        items: list[Item] = []
        found_root = False
        for pattern, split in self.roots:
            folders = [raw] if pattern == "." else sorted(p for p in raw.glob(pattern) if p.is_dir())
            for folder in folders:
                found_root = True
                pats = (
                    tuple("**/" + p for p in self.image_patterns) if self.recursive else self.image_patterns
                )
                for img in sorted_files(folder, pats, exclude=self.exclude):
                    mask = self.mask_for(img)
                    if not mask.exists():
                        raise LayoutError(mask, f"label file of image {img.name} is missing")
                    sp = hash_split(self.split_key(img, raw)) if split == "hash" else split
                    stem = Path(rel(img, raw)).with_suffix("").as_posix()
                    for tag in ("_img", "_im"):
                        stem = stem[: -len(tag)] if stem.endswith(tag) else stem
                    name = safe_name(stem)
                    items.append(
                        Item(name=name, split=sp, ref=(rel(img, raw), rel(mask, raw)), source=rel(img, raw))
                    )
        if not found_root:
            raise LayoutError(raw / self.roots[0][0], f"missing folder; expected layout:\n{self.layout}")
        return items

    def load(self, raw: Path, item: Item) -> Example:
        return Example(read_image(raw / item.ref[0]), read_labels(raw / item.ref[1]))
