"""`cpsam prep`: list, download, convert datasets; fill the flow cache; synthetic data; crops.

cpsam prep list [-v]                               datasets, licence, size, what to get by hand
cpsam prep download NAME --out DIR                  public URLs: resumable, sha256-checked
cpsam prep convert NAME --raw DIR --out DIR         raw layout -> canonical dataset (parallel)
cpsam prep flows DIR                                flow cache flows/NAME.tif (cpsam.dynamics); checks examples
cpsam prep synth OUT [--n 8 --modality phase]       synthetic cells with masks
cpsam prep timelapse STACK... --out DIR             N random frames x K x K crops per stack
cpsam prep subimages ROOT --out DIR                 fixed-size tiles or per-cell windows
cpsam prep export ROOT --out DIR                    canonical -> NAME_img.tif / NAME_masks.tif
cpsam prep info ROOT... [--quick]                   summary; reads and checks every example
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from cpsam.cli_types import non_negative_int, positive_int
from cpsam.command import UsageError, exit_codes, interruptible
from cpsam.io import InputFileError, OutputPathError, check_output_dir

WORKERS = min(8, os.cpu_count() or 1)


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep list`."""
    p.add_argument("-v", "--verbose", action="store_true", help="also print URLs and the expected raw layout")
    p.add_argument("name", nargs="?", help="show one dataset only (implies -v)")


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep download`."""
    p.add_argument("name")
    p.add_argument("--out", required=True, type=Path, help="folder for the archives (and extracted files)")
    p.add_argument("--no-extract", action="store_true", help="keep the archives packed")
    p.add_argument("--only", default=None, help="only files whose name contains this text (e.g. U373)")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep convert`."""
    p.add_argument("name")
    p.add_argument("--raw", required=True, type=Path, help="the raw folder in the documented layout")
    p.add_argument("--out", required=True, type=Path, help="canonical dataset folder (created / extended)")
    p.add_argument("--workers", type=positive_int, default=WORKERS, help="processes")
    p.add_argument("--limit", type=positive_int, default=None, help="convert only the first N examples (N >= 1)")
    p.add_argument(
        "--split",
        default="train",
        choices=("train", "val", "test"),
        help="split for `folder` / `seg_npy` sources without train/val/test sub-folders",
    )


def add_flows_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep flows`."""
    p.add_argument("root", type=Path)
    p.add_argument("--workers", type=positive_int, default=WORKERS)
    p.add_argument("--force", action="store_true", help="recompute existing flow files")


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep synth`."""
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--modality", choices=("fluorescence", "phase"), default="fluorescence")
    p.add_argument("--nuclear-channel", action="store_true", help="fluorescence: add a nucleus channel")
    p.add_argument("--diameter", type=float, default=30.0, help="mean cell diameter in px")
    p.add_argument("--size", type=int, default=256, help="image side in px")
    p.add_argument("--coverage", type=float, default=0.55, help="fraction of the area covered by cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "val", "test"))


def add_timelapse_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep timelapse`."""
    p.add_argument("stacks", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--masks", nargs="+", type=Path, default=None, help="matching label stacks (optional)")
    p.add_argument("--frames", type=positive_int, default=5, help="random frames per stack (default 5)")
    p.add_argument("--crop", type=positive_int, default=100,
                   help="crop side in px before the border (default 100; must exceed 2 x --border)")
    p.add_argument("--border", type=non_negative_int, default=2, help="zero border in px on each side (default 2)")
    p.add_argument("--seed", type=int, default=0)


def add_subimages_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep subimages`."""
    p.add_argument("root", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=("tiles", "cells"), default="tiles")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--context", type=float, default=2.0, help="cells: window side / object bbox side")


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep info`."""
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="read index.csv only (by default every image and mask is read and checked: NaN/Inf "
                        "pixels, unreadable files, sizes)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam prep export`."""
    p.add_argument("root", type=Path)
    p.add_argument("--out", required=True, type=Path)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """The error policy of every `cpsam prep` command (each `run_NAME` is decorated with it): a file, download or
    value problem is one line, exit 1 (an unusable --out: 2); Ctrl-C / SIGTERM exit 130 / 143, finished files
    complete."""
    from data_prep.download import DownloadError  # here: its HTTP client loads only for `cpsam prep`

    with interruptible("finished files are complete (each is written atomically), rerun the same command to "
                       "continue"):
        with exit_codes(((InputFileError, DownloadError, KeyError, ValueError, OSError), 1)):
            yield


@_reported()
def run_list(args: argparse.Namespace) -> int:
    """`cpsam prep list`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.sources import SOURCES

    names = [args.name] if args.name else list(SOURCES)
    for name in names:
        if name not in SOURCES:
            print(f"cpsam prep: unknown dataset {name!r}; known: {', '.join(SOURCES)}", file=sys.stderr)
            return 2
        src = SOURCES[name]()
        if args.verbose or args.name:
            print(src.describe() + "\n")
        else:
            how = "local" if src.name in ("folder", "seg_npy") else "by hand" if src.manual else "download"
            print(f"{name:10s} {how:9s} {src.license[:38]:38s} {src.size[:40]:40s} {src.title}")
    return 0


@_reported()
def run_download(args: argparse.Namespace) -> int:
    """`cpsam prep download`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.download import download, extract
    from data_prep.sources import get_source

    src = get_source(args.name)
    if src.manual or not src.downloads:
        print(f"{src.name} cannot be downloaded automatically:\n{src.manual or '  no public URL known'}")
        return 2
    for d in src.downloads:
        if args.only and args.only not in d.filename:
            continue
        print(f"{d.url}\n  -> {args.out / d.filename}" + ("" if d.sha256 else "  (no checksum known)"))
        path = download(d.url, args.out / d.filename, sha256=d.sha256)
        if not args.no_extract and path.suffix in (".zip", ".gz", ".tar", ".tgz"):
            extract(path, args.out)
    print(f"done; now: cpsam prep convert {src.name} --raw {args.out} --out CANONICAL_DIR")
    return 0


@_reported()
def run_convert(args: argparse.Namespace) -> int:
    """`cpsam prep convert`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.convert import convert
    from data_prep.sources import get_source

    src = (
        get_source(args.name, split=args.split)
        if args.name in ("folder", "seg_npy")
        else get_source(args.name)
    )
    try:
        check_output_dir(args.out)
    except OutputPathError as exc:
        raise UsageError(f"--out {exc}") from exc
    rep = convert(src, args.raw, args.out, workers=args.workers, limit=args.limit)  # prints each failure once
    print(
        f"{src.name}: {rep.written} written, {rep.skipped} already done, {len(rep.failed)} failed "
        f"of {rep.total} -> {args.out}"
    )
    if rep.stopped:
        print(f"cpsam prep convert: stopped early: {rep.stopped}; the examples written are complete, "
              "rerun the same command to continue", file=sys.stderr)
    return 1 if rep.failed or rep.stopped else 0


def _report_bad_examples(ds, action: str) -> int:
    """Check every example of `ds` (see CanonicalDataset.problem); one line per bad one; returns how many."""
    # imported when this command runs, not for --help (start-up time)
    from tqdm import tqdm

    n_bad = 0
    for i in tqdm(range(len(ds)), desc="checking", unit="img", file=sys.stderr, disable=len(ds) < 50):
        problem = ds.problem(i)
        if problem is not None:
            n_bad += 1
            tqdm.write(f"cpsam prep {action}: bad example {ds[i].name}: {problem}", file=sys.stderr)
    return n_bad


@_reported()
def run_flows(args: argparse.Namespace) -> int:
    """`cpsam prep flows`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.canonical import CanonicalDataset
    from data_prep.flows import fill_flow_cache

    n_bad = _report_bad_examples(CanonicalDataset(args.root), "flows")
    n = fill_flow_cache(args.root, workers=args.workers, force=args.force)
    print(f"{n} flow files written under {args.root / 'flows'}")
    if n_bad:
        print(f"cpsam prep flows: {n_bad} bad example(s) in {args.root} (listed above): fix or remove them "
              "before training", file=sys.stderr)
    return 1 if n_bad else 0


@_reported()
def run_synth(args: argparse.Namespace) -> int:
    """`cpsam prep synth`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.synthetic import SyntheticConfig, write_synthetic_dataset

    cfg = SyntheticConfig(
        shape=(args.size, args.size),
        diameter=args.diameter,
        coverage=args.coverage,
        modality=args.modality,
        nuclear_channel=args.nuclear_channel,
    )
    rows = write_synthetic_dataset(args.out, args.n, cfg, seed=args.seed, split=args.split)
    print(f"{len(rows)} synthetic {args.modality} images -> {args.out}")
    return 0


@_reported()
def run_timelapse(args: argparse.Namespace) -> int:
    """`cpsam prep timelapse`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.timelapse import crop_options_problem, timelapse_crops

    problem = crop_options_problem(frames=args.frames, crop=args.crop, border=args.border)
    if problem is not None:
        raise UsageError(problem)
    out = timelapse_crops(args.stacks, args.out, masks=args.masks, frames=args.frames, crop=args.crop,
                          border=args.border, seed=args.seed)
    print(f"{len(out)} crops -> {args.out}")
    return 0


@_reported()
def run_subimages(args: argparse.Namespace) -> int:
    """`cpsam prep subimages`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.subimages import make_subimages

    rows = make_subimages(
        args.root, args.out, mode=args.mode, size=args.size, overlap=args.overlap, context=args.context
    )
    print(f"{len(rows)} subimages -> {args.out}")
    return 0


@_reported()
def run_info(args: argparse.Namespace) -> int:
    """`cpsam prep info`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.canonical import CanonicalDataset

    ds = CanonicalDataset(args.roots)
    n_bad = 0 if args.quick else _report_bad_examples(ds, "info")
    print(f"{'dataset':16s} {'split':6s} {'images':>7s} {'objects':>9s} {'median diam px':>15s}")
    for dataset, split, n, objects, diam in ds.summary():
        print(f"{dataset:16s} {split:6s} {n:7d} {objects:9d} {diam:15.1f}")
    flows = sum(ds.has_flows(i) for i in range(len(ds)))
    checked = "not checked (--quick)" if args.quick else f"{n_bad} bad"
    print(f"{len(ds)} images, flow cache {flows}/{len(ds)}, {checked}")
    return 1 if n_bad else 0


@_reported()
def run_export(args: argparse.Namespace) -> int:
    """`cpsam prep export`; returns the exit code."""
    # imported when this command runs, not for --help (start-up time)
    from data_prep.canonical import export_pairs

    print(f"{export_pairs(args.root, args.out)} pairs -> {args.out}")
    return 0
