"""Run a Source converter over a raw folder: parallel, with a progress bar, idempotent, resumable.

Rerunning skips every example whose mask file already exists (the mask is written last, each file
atomically), so an interrupted run resumes where it stopped and never leaves a half-written file.
index.csv is rewritten atomically every `flush_every` examples and at the end (also on Ctrl-C and
SIGTERM, and when a full disk stops the conversion; if even that fails, the rerun rebuilds the rows of
finished examples from their files).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cpsam.io import InputFileError, describe_os_error, is_storage_error, read_image, read_labels
from data_prep.canonical import (
    IndexRow,
    image_path,
    make_row,
    mask_path,
    read_index,
    to_chw,
    write_example,
    write_index,
)
from data_prep.sources.base import Item, LayoutError, Source, safe_name


@dataclass
class ConvertReport:
    """What a conversion did: examples written, skipped (already done) and failed (name -> 'PATH: reason')."""

    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    total: int = 0
    stopped: str | None = None  # why the conversion stopped early (disk full...), None if it ran to the end
    index_error: str | None = None  # why index.csv could not be written at the end


def canonical_name(source: Source, item: Item) -> str:
    """The canonical example name: `<dataset>_<item name>` (unique across datasets in one folder)."""
    return safe_name(source.name, item.name)


def _convert_one(source: Source, raw: Path, out: Path, item: Item) -> IndexRow:
    ex = source.load(raw, item)
    return write_example(
        out,
        canonical_name(source, item),
        ex.image,
        ex.labels,
        dataset=source.name,
        split=item.split,
        license=source.license,
        source=item.source,
        channel_names=source.channel_names,
        ignore=ex.ignore,
    )


def _row_from_files(source: Source, out: Path, item: Item) -> IndexRow:
    name = canonical_name(source, item)
    image = to_chw(read_image(image_path(out, name)))
    labels = read_labels(mask_path(out, name))
    return make_row(
        name,
        image,
        labels,
        dataset=source.name,
        split=item.split,
        license=source.license,
        source=item.source,
        channel_names=source.channel_names,
    )


def _ignore_signals_in_worker() -> None:
    """Worker processes leave Ctrl-C and SIGTERM to the main process, which lets the running examples
    finish (each is written atomically) and cancels the queued ones."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def failure_text(raw: Path, item: Item, exc: BaseException) -> str:
    """'PATH: problem' for a failed example: the file the error names (made absolute under `raw`), else
    the example's raw source file."""
    if isinstance(exc, InputFileError):
        path = exc.path if exc.path.is_absolute() else raw / exc.path
        return f"{path}: {exc.problem}"
    if isinstance(exc, OSError) and exc.filename:
        return describe_os_error(exc)
    where = raw / item.source if item.source else raw / item.name
    return f"{where}: {exc}"


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")


def convert(
    source: Source,
    raw: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    limit: int | None = None,
    progress: bool = True,
    flush_every: int = 50,
) -> ConvertReport:
    """Convert raw folder `raw` of `source` into the canonical dataset folder `out`.

    `workers` > 1 uses that many processes. `limit` (>= 1) converts only the first N items (a quick look).
    Examples that fail to load are reported in `ConvertReport.failed` (name -> 'PATH: problem') and,
    with `progress`, one line each on stderr; the others still convert. A full disk (or a read-only
    or over-quota one) stops the conversion: `ConvertReport.stopped` says why; the examples written
    so far are complete and a rerun continues. A layout problem found while listing raises LayoutError.
    """
    _check_limit(limit)
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise LayoutError(raw, "raw folder does not exist")
    items = source.items(raw)
    if not items:
        raise LayoutError(raw, f"no {source.name} examples found; expected layout:\n{source.layout}")
    names = [canonical_name(source, it) for it in items]
    dupes = {n for n, c in Counter(names).items() if c > 1}
    if dupes:
        raise LayoutError(raw, f"example names collide after conversion: {sorted(dupes)[:5]}")
    if limit is not None:
        items = items[:limit]
    out.mkdir(parents=True, exist_ok=True)
    rows = {r.name: r for r in read_index(out)}
    report = ConvertReport(total=len(items))
    todo = []
    for it in items:
        name = canonical_name(source, it)
        if mask_path(out, name).exists() and image_path(out, name).exists():
            if name not in rows:  # finished before the last index flush
                rows[name] = _row_from_files(source, out, it)
            report.skipped += 1
        else:
            todo.append(it)
    bar = tqdm(
        total=len(items),
        initial=report.skipped,
        desc=f"convert {source.name}",
        disable=not progress,
        unit="img",
        file=sys.stderr,
    )

    def done(item: Item, row: IndexRow | None, exc: BaseException | None) -> None:
        if row is not None:
            rows[row.name] = row
            report.written += 1
            if report.written % flush_every == 0:
                try:
                    write_index(out, rows.values())
                except OSError as exc:
                    if is_storage_error(exc):
                        raise _Stop(f"index.csv not written: {describe_os_error(exc)}") from exc
                    raise
        else:
            assert exc is not None
            report.failed[item.name] = failure_text(raw, item, exc)
            if progress:
                tqdm.write(f"failed {report.failed[item.name]}", file=sys.stderr)
            if is_storage_error(exc):
                raise _Stop(report.failed[item.name])
        bar.update(1)

    try:
        _run_items(source, raw, out, todo, workers, done)
    except _Stop as stop:
        report.stopped = str(stop)
    finally:
        bar.close()
        try:
            write_index(out, rows.values())
        except OSError as exc:
            report.index_error = describe_os_error(exc)
            if report.stopped is None:
                report.stopped = f"index.csv not written: {report.index_error}"
    return report


class _Stop(Exception):
    """Nothing more can be written to the output folder; stop converting."""


_ITEM_ERRORS = (InputFileError, ValueError, KeyError, OSError)


def _run_items(source: Source, raw: Path, out: Path, todo: list[Item], workers: int, done) -> None:
    """Convert `todo` in this process or in `workers` processes, calling done(item, row, error) per item."""
    if workers <= 1:
        for it in todo:
            try:
                row = _convert_one(source, raw, out, it)
            except _ITEM_ERRORS as exc:
                done(it, None, exc)
            else:
                done(it, row, None)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_signals_in_worker)
    try:
        futures = {pool.submit(_convert_one, source, raw, out, it): it for it in todo}
        for fut in as_completed(futures):
            it = futures[fut]
            try:
                row = fut.result()
            except _ITEM_ERRORS as exc:
                done(it, None, exc)
            else:
                done(it, row, None)
    finally:  # on Ctrl-C / SIGTERM / a full disk do not start the queued examples; running ones finish
        pool.shutdown(wait=True, cancel_futures=True)
