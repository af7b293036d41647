"""Tables of row dicts ({column: value}) as GitHub Markdown and as CSV files written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from cpsam.io import atomic_path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """GitHub Markdown table of `columns` (floats with 4 decimals; a missing value is an empty cell)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> str:
    """CSV text (header + rows, CRLF line ends, full float precision); columns default to the first row's keys,
    keys outside `columns` are left out."""
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=cols, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV atomically (full float precision); columns default to the first row's keys."""
    with atomic_path(path) as tmp:
        tmp.write_text(csv_text(rows, columns), newline="")
    return Path(path)
