"""Find label images in two folder trees and pair them by name (prediction vs ground truth).

Rule (documented for users in `cpsam eval --help`); the naming parts come from `cpsam.pairing`:

* Label files are files with a label suffix (`cpsam.pairing.LABEL_SUFFIXES`: .tif, .tiff, .png, .npy,
  ...) anywhere under the folder; folders whose name starts with `.` or `_` (e.g. `_qc`) are skipped.
* A file's *key* is `cpsam.pairing.label_key`: its name without the extension and without a trailing
  label marker `_masks`, `_cp_masks`, `_mask`, `_labels`, `_label` or `_seg` (NAME_seg.npy, the
  Cellpose GUI's file), so `NAME.tif`, `NAME_masks.tif`, `NAME_cp_masks.png` and `NAME_seg.npy` all
  have the key `NAME`; after a marker, a trailing `_img` or `_image` is dropped too, so masks
  predicted for `NAME_img.tif` (`NAME_img_masks.tif`) pair with `NAME_masks.tif`.
* If any file in a tree carries a marker, only marked files are label files there (so
  `NAME_img.tif`, flows and quick-look PNGs beside `NAME_masks.tif` are ignored); otherwise every
  file is a label file. A `NAME_seg.npy` beside a label image of the same key gives way to it (the
  label image takes precedence, as in `cpsam.pairing`; `cpsam segment` writes both).
* Files pair first by (sub-folder, key); what is left pairs by key alone when that key is unique
  in both trees (a flat prediction folder against a ground truth split into sub-folders).
* The dataset of a pair is the first sub-folder of its reference (ground-truth) file, or the
  reference folder's own name for files at its top level.
* Reference files without a prediction, predictions without a reference, and keys that occur more
  than once in a tree are all reported, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cpsam.pairing import LABEL_SUFFIXES, SEG_TAG, images_among_labels, label_key, label_rank


@dataclass(frozen=True)
class LabelFile:
    """A label image found under a root folder."""

    path: Path
    key: str  # name without extension and mask marker
    folder: str  # parent folder relative to the root, POSIX style; "" at the top level


@dataclass(frozen=True)
class Pair:
    """A reference (ground truth) file and the prediction for it."""

    dataset: str
    key: str
    reference: Path
    prediction: Path


@dataclass
class Pairing:
    """Result of pairing two trees."""

    pairs: list[Pair] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # reference files with no prediction
    extra: list[Path] = field(default_factory=list)  # predictions with no reference
    duplicates: list[str] = field(default_factory=list)  # "key: path, path" for ambiguous keys


def split_key(name: str) -> tuple[str, bool]:
    """(key, had_marker) for a file name, e.g. 'a_cp_masks.png' -> ('a', True) (`cpsam.pairing.label_key`)."""
    key, tag = label_key(name)
    return key, tag is not None


def find_label_files(root: Path) -> list[LabelFile]:
    """Label files under `root` (recursive), sorted by path; one per (folder, key), see the module rule."""
    return _scan(root)[0]


def _scan(root: Path) -> tuple[list[LabelFile], list[str]]:
    """(label files, one per (folder, key)), ["key: path, path" for each (folder, key) of several label
    images]: of several files of one key in one folder the first by `cpsam.pairing.label_rank` is used."""
    found: list[tuple[LabelFile, str | None]] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith((".", "_")) for part in rel.parts[:-1]) or rel.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        key, tag = label_key(path.name)
        folder = rel.parent.as_posix()
        found.append((LabelFile(path, key, "" if folder == "." else folder), tag))
    if any(tag is not None for _, tag in found):
        by_folder: dict[Path, list[Path]] = {}
        for f, _ in found:
            by_folder.setdefault(f.path.parent, []).append(f.path)
        also_images = set().union(*(images_among_labels(paths) for paths in by_folder.values()))
        found = [(f, tag) for f, tag in found if tag is not None and f.path not in also_images]
    groups: dict[tuple[str, str], list[tuple[LabelFile, str | None]]] = {}
    for f, tag in found:
        groups.setdefault((f.folder, f.key), []).append((f, tag))
    files, duplicates = [], []
    for (_, key), group in sorted(groups.items()):
        group.sort(key=lambda ft: label_rank(ft[0].path.name))
        files.append(group[0][0])
        images = [f for f, tag in group if tag != SEG_TAG]  # a _seg.npy beside a label image gives way silently
        if len(images) > 1:
            duplicates.append(f"{key}: {', '.join(str(f.path) for f in sorted(images, key=lambda f: f.path))}")
    return sorted(files, key=lambda f: f.path), duplicates
def dataset_of(file: LabelFile, root: Path) -> str:
    """First sub-folder of the file under its root, or the root folder's own name."""
    return file.folder.split("/")[0] if file.folder else (root.resolve().name or str(root))


def pair_files(pred_root: Path, ref_root: Path) -> Pairing:
    """Pair predictions under `pred_root` with reference label files under `ref_root`."""
    (preds, pred_dups), (refs, ref_dups) = _scan(pred_root), _scan(ref_root)
    out = Pairing(duplicates=pred_dups + ref_dups)
    pred_by_loc = {(f.folder, f.key): f for f in preds}
    left_refs: list[LabelFile] = []
    used: set[Path] = set()
    for ref in refs:
        pred = pred_by_loc.get((ref.folder, ref.key))
        if pred is not None and pred.path not in used:
            used.add(pred.path)
            out.pairs.append(Pair(dataset_of(ref, ref_root), ref.key, ref.path, pred.path))
        else:
            left_refs.append(ref)
    left_preds = [p for p in preds if p.path not in used]
    pred_keys = Counter(p.key for p in left_preds)
    ref_keys = Counter(r.key for r in left_refs)
    pred_by_key = {p.key: p for p in left_preds}
    for ref in left_refs:
        if ref_keys[ref.key] == 1 and pred_keys.get(ref.key) == 1:
            pred = pred_by_key[ref.key]
            used.add(pred.path)
            out.pairs.append(Pair(dataset_of(ref, ref_root), ref.key, ref.path, pred.path))
        else:
            out.missing.append(ref.path)
    out.extra = [p.path for p in preds if p.path not in used]
    out.pairs.sort(key=lambda p: (p.dataset, p.key))
    return out
