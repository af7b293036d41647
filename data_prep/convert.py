"""Run a Source converter over a raw folder: parallel, with a progress bar, idempotent, resumable.

Rerunning skips every example whose mask file already exists (the mask is written last, each file
atomically), so an interrupted run resumes where it stopped and never leaves a half-written file.
index.csv is rewritten atomically every `flush_every` examples and at the end (also on Ctrl-C).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cpsam.io import InputFileError, read_image, read_labels
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
    """What a conversion did: examples written, skipped (already done) and failed (name -> reason)."""

    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    total: int = 0


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

    `workers` > 1 uses that many processes. `limit` converts only the first N items (a quick look).
    Examples that fail to load are reported in `ConvertReport.failed` (name -> message naming the
    file) and the others still convert. A layout problem found while listing raises LayoutError.
    """
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
    )

    def done(item: Item, row: IndexRow | None, err: str | None) -> None:
        if row is not None:
            rows[row.name] = row
            report.written += 1
            if report.written % flush_every == 0:
                write_index(out, rows.values())
        else:
            report.failed[item.name] = err or "unknown error"
            tqdm.write(f"skipped {item.name}: {err}")
        bar.update(1)

    try:
        if workers <= 1:
            for it in todo:
                try:
                    done(it, _convert_one(source, raw, out, it), None)
                except (InputFileError, ValueError, KeyError, OSError) as exc:
                    done(it, None, str(exc))
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            try:
                futures = {pool.submit(_convert_one, source, raw, out, it): it for it in todo}
                for fut in as_completed(futures):
                    it = futures[fut]
                    try:
                        done(it, fut.result(), None)
                    except (InputFileError, ValueError, KeyError, OSError) as exc:
                        done(it, None, str(exc))
            finally:  # on Ctrl-C do not start the queued examples; running ones finish or clean up
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        write_index(out, rows.values())
    return report
