"""The canonical dataset format (DESIGN.md) and its reader used by train, distill and eval.

A canonical dataset is a folder

    images/NAME.tif   (H, W) or (C, H, W), pixel values as found (no rescaling)
    masks/NAME.tif    (H, W) uint16 (uint32 above 65535 objects), 0 = background, ids 1..N consecutive
    flows/NAME.tif    optional cache: float32 (2, H, W) unit flows [dY, dX] (`cpsam prep flows`)
    ignore/NAME.tif   optional uint8 (H, W), 1 where the loss should ignore pixels (ambiguous regions)
    index.csv         one row per example, columns INDEX_COLUMNS

An example is complete when its mask file exists: writers put the image first and the mask last,
each atomically, so an interrupted conversion never leaves a half-written file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from cpsam.io import (
    InputFileError,
    atomic_path,
    read_image,
    read_labels,
    squeeze_to_2d,
    write_labels,
    write_tiff,
)
from data_prep.labels import count_objects, median_diameter, relabel_consecutive, validate_labels

INDEX_NAME = "index.csv"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class IndexRow:
    """One line of index.csv. `channels` = number of image channels (1 for (H, W) images);
    `channel_names` = comma-separated meaning of each channel (e.g. "cytoplasm,nucleus")."""

    name: str
    dataset: str
    split: str
    channels: int
    height: int
    width: int
    n_objects: int
    median_diameter: float
    license: str
    source: str
    channel_names: str = ""


INDEX_COLUMNS = tuple(f.name for f in fields(IndexRow))
_INT_COLUMNS = {"channels", "height", "width", "n_objects"}


def to_chw(image: np.ndarray, *, path: str | os.PathLike[str] = "<array>") -> np.ndarray:
    """Bring an image to the canonical (H, W) or (C, H, W) layout.

    A trailing axis of size 2-4 on a 3-D array is taken as the channel axis (RGB/RGBA, YXS);
    an alpha channel (4th of 4) is dropped; a single channel is squeezed to (H, W). Any positive
    size is accepted (a 1 x 1 or 1 x N image is odd but valid).
    Raises InputFileError (naming `path`) for anything that is not a 2-D image.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] <= 4 and image.shape[0] > 4:
        image = image[..., :3] if image.shape[-1] == 4 else image
        image = np.moveaxis(image, -1, 0)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim not in (2, 3) or image.size == 0:
        raise InputFileError(path, f"expected a 2-D image (H, W) or (C, H, W) with pixels, got shape {image.shape}")
    return np.ascontiguousarray(image)


def check_finite(image: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Return `image`, or raise InputFileError naming `path` when it holds NaN or Inf pixels
    (`cpsam segment` refuses such images; a training set must not contain them either)."""
    if np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.complexfloating):
        n_bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if n_bad:
            raise InputFileError(path, f"image contains {n_bad} NaN/Inf pixel values")
    return image


def image_path(root: str | os.PathLike[str], name: str) -> Path:
    """images/NAME.tif under `root`."""
    return Path(root) / "images" / f"{name}.tif"


def mask_path(root: str | os.PathLike[str], name: str) -> Path:
    """masks/NAME.tif under `root`."""
    return Path(root) / "masks" / f"{name}.tif"


def flow_path(root: str | os.PathLike[str], name: str) -> Path:
    """flows/NAME.tif under `root` (the flow cache)."""
    return Path(root) / "flows" / f"{name}.tif"


def ignore_path(root: str | os.PathLike[str], name: str) -> Path:
    """ignore/NAME.tif under `root` (optional ignore mask)."""
    return Path(root) / "ignore" / f"{name}.tif"


def write_example(
    root: str | os.PathLike[str],
    name: str,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str,
    split: str,
    license: str,
    source: str,
    channel_names: str = "",
    ignore: np.ndarray | None = None,
) -> IndexRow:
    """Write one example (image, relabelled mask, optional ignore mask) atomically; return its row.

    `image`: (H, W), (C, H, W) or (H, W, C<=4) any dtype; `labels`: (H, W) integer instance ids (any
    numbering; relabelled to 1..N here). The mask is written last: its presence marks completion.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if "/" in name or name.startswith("."):
        raise ValueError(f"invalid example name {name!r}")
    where = source or name
    image = check_finite(to_chw(image, path=where), where)
    labels = squeeze_to_2d(np.asarray(labels))
    if labels.shape != image.shape[-2:]:
        raise InputFileError(where, f"mask shape {labels.shape} does not match image shape {image.shape[-2:]}")
    try:
        labels = relabel_consecutive(labels)
    except (ValueError, TypeError) as exc:
        raise InputFileError(where, f"mask: {exc}") from exc
    written: list[Path] = []
    try:
        # listed before written: an interruption just after a write returns still removes the file
        written.append(image_path(root, name))
        write_tiff(written[-1], image, photometric="minisblack" if image.ndim == 3 else None)
        if ignore is not None:
            written.append(ignore_path(root, name))
            write_tiff(written[-1], (np.asarray(ignore) > 0).astype(np.uint8))
        write_labels(mask_path(root, name), labels)
    except BaseException:  # no image without its mask (disk full, Ctrl-C, SIGTERM)
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return make_row(
        name,
        image,
        labels,
        dataset=dataset,
        split=split,
        license=license,
        source=source,
        channel_names=channel_names,
    )


def make_row(
    name: str,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str,
    split: str,
    license: str,
    source: str,
    channel_names: str = "",
) -> IndexRow:
    """The index row of a canonical (image, labels) pair."""
    return IndexRow(
        name=name,
        dataset=dataset,
        split=split,
        channels=1 if image.ndim == 2 else int(image.shape[0]),
        height=int(labels.shape[0]),
        width=int(labels.shape[1]),
        n_objects=count_objects(labels),
        median_diameter=round(median_diameter(labels), 3),
        license=license,
        source=source,
        channel_names=channel_names,
    )


def read_index(root: str | os.PathLike[str]) -> list[IndexRow]:
    """Rows of root/index.csv ([] when absent). Raises InputFileError for a malformed index."""
    path = Path(root) / INDEX_NAME
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or []) and c != "channel_names"]
        if missing:
            raise InputFileError(path, f"index.csv lacks columns {missing}")
        for line, rec in enumerate(reader, start=2):
            try:
                kw = {c: rec.get(c) or "" for c in INDEX_COLUMNS}
                for c in _INT_COLUMNS:
                    kw[c] = int(kw[c])
                kw["median_diameter"] = float(kw["median_diameter"])
                rows.append(IndexRow(**kw))
            except (TypeError, ValueError) as exc:
                raise InputFileError(path, f"line {line} is malformed ({exc})") from exc
    return rows


def write_index(root: str | os.PathLike[str], rows: Iterable[IndexRow]) -> Path:
    """Write root/index.csv atomically, rows sorted by (dataset, split, name)."""
    path = Path(root) / INDEX_NAME
    rows = sorted(rows, key=lambda r: (r.dataset, r.split, r.name))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path


class CanonicalDataset(Sequence[IndexRow]):
    """Read-only view of a canonical dataset folder, optionally filtered by split and dataset.

    `ds[i]` is the i-th IndexRow; `ds.image(i)`, `ds.mask(i)`, `ds.flows(i)` load the arrays.
    Several roots can be combined with `CanonicalDataset([root1, root2])`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        split: str | Sequence[str] | None = None,
        datasets: str | Sequence[str] | None = None,
    ) -> None:
        roots = [Path(root)] if isinstance(root, (str, os.PathLike)) else [Path(r) for r in root]
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        dsets = {datasets} if isinstance(datasets, str) else set(datasets) if datasets is not None else None
        self.roots = roots
        self._rows: list[IndexRow] = []
        self._root_of: list[Path] = []
        for r in roots:
            if not (r / INDEX_NAME).exists():
                raise InputFileError(r / INDEX_NAME, "not a canonical dataset (index.csv missing)")
            for row in read_index(r):
                if splits is not None and row.split not in splits:
                    continue
                if dsets is not None and row.dataset not in dsets:
                    continue
                self._rows.append(row)
                self._root_of.append(r)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self._rows[i]

    def __iter__(self) -> Iterator[IndexRow]:
        return iter(self._rows)

    @property
    def names(self) -> list[str]:
        """Example names in index order."""
        return [r.name for r in self._rows]

    def root(self, i: int) -> Path:
        """The dataset folder holding example i."""
        return self._root_of[i]

    def image_path(self, i: int) -> Path:
        return image_path(self._root_of[i], self._rows[i].name)

    def mask_path(self, i: int) -> Path:
        return mask_path(self._root_of[i], self._rows[i].name)

    def flow_path(self, i: int) -> Path:
        return flow_path(self._root_of[i], self._rows[i].name)

    def image(self, i: int) -> np.ndarray:
        """Image i as stored: (H, W) or (C, H, W), original dtype. InputFileError for NaN/Inf pixels."""
        path = self.image_path(i)
        return check_finite(to_chw(read_image(path), path=path), path)

    def mask(self, i: int) -> np.ndarray:
        """Mask i: (H, W) uint16/uint32, 0 = background, 1..N."""
        return read_labels(self.mask_path(i))

    def has_flows(self, i: int) -> bool:
        return self.flow_path(i).exists()

    def flows(self, i: int) -> np.ndarray | None:
        """Cached flows of example i: float32 (2, H, W) [dY, dX], or None when not cached."""
        p = self.flow_path(i)
        if not p.exists():
            return None
        flows = read_image(p).astype(np.float32, copy=False)
        if flows.shape != (2, *self._shape(i)):
            raise InputFileError(
                p, f"flow cache must be (2, H, W) = (2, {self._shape(i)}), got {flows.shape}"
            )
        return flows

    def ignore(self, i: int) -> np.ndarray | None:
        """Ignore mask of example i, bool (H, W), or None."""
        p = ignore_path(self._root_of[i], self._rows[i].name)
        return read_image(p) > 0 if p.exists() else None

    def summary(self) -> list[tuple[str, str, int, int, float]]:
        """(dataset, split, images, objects, median of per-image median diameters) per group, sorted."""
        groups: dict[tuple[str, str], list[IndexRow]] = {}
        for r in self._rows:
            groups.setdefault((r.dataset, r.split), []).append(r)
        return [
            (d, s, len(rs), sum(r.n_objects for r in rs), float(np.median([r.median_diameter for r in rs])))
            for (d, s), rs in sorted(groups.items())
        ]

    def problem(self, i: int) -> str | None:
        """Why example i is unusable ('PATH: problem': unreadable image or mask, NaN/Inf pixels, sizes
        that differ from each other or from index.csv, ids not 1..N), or None when it is fine."""
        try:
            image, mask = self.image(i), self.mask(i)
        except InputFileError as exc:
            return str(exc)
        if image.shape[-2:] != mask.shape:
            return f"{self.mask_path(i)}: mask shape {mask.shape} differs from image shape {image.shape[-2:]}"
        if mask.shape != self._shape(i):
            return f"{self.mask_path(i)}: shape {mask.shape} differs from index.csv {self._shape(i)}"
        try:
            validate_labels(mask)
        except ValueError as exc:
            return f"{self.mask_path(i)}: {exc}"
        return None

    def _shape(self, i: int) -> tuple[int, int]:
        return (self._rows[i].height, self._rows[i].width)


def export_pairs(
    root: str | os.PathLike[str], out: str | os.PathLike[str], *, split: str | None = None
) -> int:
    """Write a canonical dataset back as a plain folder of pairs out/NAME_img.tif + out/NAME_masks.tif.

    Returns the number of pairs written (the `folder` converter reads this layout back).
    """
    ds = CanonicalDataset(root, split=split)
    for i, row in enumerate(ds):
        write_tiff(
            Path(out) / f"{row.name}_img.tif",
            ds.image(i),
            photometric="minisblack" if ds[i].channels > 1 else None,
        )
        write_labels(Path(out) / f"{row.name}_masks.tif", ds.mask(i))
    return len(ds)
