"""`OUT/summary.csv` of `cpsam segment`: one row per input image of the run, from every rank.

Columns, in this order: file, status, cells, diameter, seconds, rank.

- file: the image's file name (names are unique within an input folder).
- status: "ok" (outputs written), "failed" (unreadable, unusable or unwritable: the log names the problem),
  "skipped-existing" (--skip-existing found a complete output set) or "not-attempted" (the rank stopped
  early: a full or read-only disk).
- cells: number of masks ("ok" rows; empty otherwise).
- diameter: the diameter used in pixels, given or estimated ("ok" rows; empty otherwise).
- seconds: wall time this rank spent on the image, from the end of its previous image (reading,
  network, flows -> masks, writing; the model load is not counted); empty for rows not attempted.
- rank: the process that handled the image (0 for files rank 0 rejected or skipped while planning).

Rows are sorted by file name; the file is written atomically (`cpsam.io.atomic_path`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cpsam import io

COLUMNS = ("file", "status", "cells", "diameter", "seconds", "rank")
STATUSES = ("ok", "failed", "skipped-existing", "not-attempted")
SUMMARY_NAME = "summary.csv"


@dataclass(frozen=True)
class SummaryRow:
    """One image of the run (module docstring)."""

    file: str
    status: str
    cells: int | None = None
    diameter: float | None = None
    seconds: float | None = None
    rank: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def as_csv(self) -> list[str]:
        return [
            self.file, self.status,
            "" if self.cells is None else str(self.cells),
            "" if self.diameter is None else f"{self.diameter:.6g}",
            "" if self.seconds is None else f"{self.seconds:.3f}",
            str(self.rank),
        ]


def merge_rows(parts: Iterable[Iterable[SummaryRow]]) -> list[SummaryRow]:
    """The rows of every rank as one list sorted by file name. Raises ValueError when a file appears twice
    (an image handled by two ranks: the split is broken)."""
    rows = sorted((row for part in parts for row in part), key=lambda r: r.file)
    for a, b in zip(rows, rows[1:], strict=False):
        if a.file == b.file:
            raise ValueError(f"{a.file} has two summary rows (ranks {a.rank} and {b.rank})")
    return rows


def write_summary(out_dir: str | os.PathLike[str], rows: Iterable[SummaryRow]) -> Path:
    """Write OUT_DIR/summary.csv atomically (header + `merge_rows` order); returns its path."""
    path = Path(out_dir) / SUMMARY_NAME
    rows = merge_rows([rows])
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(row.as_csv() for row in rows)
    return path


def read_summary(path: str | os.PathLike[str]) -> list[SummaryRow]:
    """The rows of a summary.csv written by `write_summary`."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return [
            SummaryRow(
                file=r["file"], status=r["status"],
                cells=int(r["cells"]) if r["cells"] else None,
                diameter=float(r["diameter"]) if r["diameter"] else None,
                seconds=float(r["seconds"]) if r["seconds"] else None,
                rank=int(r["rank"]),
            )
            for r in reader
        ]
