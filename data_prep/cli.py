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
import os
import sys
from pathlib import Path

from cpsam.io import (
    InputFileError,
    OutputPathError,
    check_output_dir,
    describe_os_error,
    interrupt_exit_code,
    interrupt_name,
    terminate_as_interrupt,
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negative values are usage errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `cpsam prep` sub-subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="datasets with licence, size and how to obtain them")
    p.add_argument("-v", "--verbose", action="store_true", help="also print URLs and the expected raw layout")
    p.add_argument("name", nargs="?", help="show one dataset only (implies -v)")

    p = sub.add_parser("download", help="download a dataset with a public URL (resumable, verified)")
    p.add_argument("name")
    p.add_argument("--out", required=True, type=Path, help="folder for the archives (and extracted files)")
    p.add_argument("--no-extract", action="store_true", help="keep the archives packed")
    p.add_argument("--only", default=None, help="only files whose name contains this text (e.g. U373)")

    p = sub.add_parser("convert", help="convert a raw dataset folder into the canonical format")
    p.add_argument("name")
    p.add_argument("--raw", required=True, type=Path, help="the raw folder in the documented layout")
    p.add_argument("--out", required=True, type=Path, help="canonical dataset folder (created / extended)")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="processes")
    p.add_argument("--limit", type=positive_int, default=None, help="convert only the first N examples (N >= 1)")
    p.add_argument(
        "--split",
        default="train",
        choices=("train", "val", "test"),
        help="split for `folder` / `seg_npy` sources without train/val/test sub-folders",
    )

    p = sub.add_parser("flows", help="fill the flow cache flows/NAME.tif of a canonical dataset")
    p.add_argument("root", type=Path)
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="recompute existing flow files")

    p = sub.add_parser("synth", help="write synthetic cells with masks as a canonical dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--modality", choices=("fluorescence", "phase"), default="fluorescence")
    p.add_argument("--nuclear-channel", action="store_true", help="fluorescence: add a nucleus channel")
    p.add_argument("--diameter", type=float, default=30.0, help="mean cell diameter in px")
    p.add_argument("--size", type=int, default=256, help="image side in px")
    p.add_argument("--coverage", type=float, default=0.55, help="fraction of the area covered by cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "val", "test"))

    p = sub.add_parser("timelapse", help="random frames x random crops from time-lapse stacks")
    p.add_argument("stacks", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--masks", nargs="+", type=Path, default=None, help="matching label stacks (optional)")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--crop", type=int, default=100)
    p.add_argument("--border", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("subimages", help="cut a canonical dataset into tiles or per-cell windows")
    p.add_argument("root", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=("tiles", "cells"), default="tiles")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--context", type=float, default=2.0, help="cells: window side / object bbox side")

    p = sub.add_parser(
        "info", help="images, objects and diameters per dataset and split of canonical folders"
    )
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="read index.csv only (by default every image and mask is read and checked: NaN/Inf "
                        "pixels, unreadable files, sizes)")

    p = sub.add_parser("export", help="write a canonical dataset as NAME_img.tif / NAME_masks.tif pairs")
    p.add_argument("root", type=Path)
    p.add_argument("--out", required=True, type=Path)


def _list(args) -> int:
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


def _download(args) -> int:
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


def _convert(args) -> int:
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
        print(f"cpsam prep convert: --out {exc}", file=sys.stderr)
        return 2
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
    from tqdm import tqdm

    n_bad = 0
    for i in tqdm(range(len(ds)), desc="checking", unit="img", file=sys.stderr, disable=len(ds) < 50):
        problem = ds.problem(i)
        if problem is not None:
            n_bad += 1
            tqdm.write(f"cpsam prep {action}: bad example {ds[i].name}: {problem}", file=sys.stderr)
    return n_bad


def _flows(args) -> int:
    from data_prep.canonical import CanonicalDataset
    from data_prep.flows import fill_flow_cache

    n_bad = _report_bad_examples(CanonicalDataset(args.root), "flows")
    n = fill_flow_cache(args.root, workers=args.workers, force=args.force)
    print(f"{n} flow files written under {args.root / 'flows'}")
    if n_bad:
        print(f"cpsam prep flows: {n_bad} bad example(s) in {args.root} (listed above): fix or remove them "
              "before training", file=sys.stderr)
    return 1 if n_bad else 0


def _synth(args) -> int:
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


def _timelapse(args) -> int:
    from data_prep.timelapse import timelapse_crops

    out = timelapse_crops(
        args.stacks,
        args.out,
        masks=args.masks,
        frames=args.frames,
        crop=args.crop,
        border=args.border,
        seed=args.seed,
    )
    print(f"{len(out)} crops -> {args.out}")
    return 0


def _subimages(args) -> int:
    from data_prep.subimages import make_subimages

    rows = make_subimages(
        args.root, args.out, mode=args.mode, size=args.size, overlap=args.overlap, context=args.context
    )
    print(f"{len(rows)} subimages -> {args.out}")
    return 0


def _info(args) -> int:
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


def _export(args) -> int:
    from data_prep.canonical import export_pairs

    print(f"{export_pairs(args.root, args.out)} pairs -> {args.out}")
    return 0


_ACTIONS = {
    "list": _list,
    "download": _download,
    "convert": _convert,
    "flows": _flows,
    "synth": _synth,
    "timelapse": _timelapse,
    "subimages": _subimages,
    "info": _info,
    "export": _export,
}


def run(args: argparse.Namespace) -> int:
    """Run one `cpsam prep` action; errors about files are reported in one line, exit code 1
    (2 for an unusable --out, 130 / 143 when interrupted by Ctrl-C / SIGTERM)."""
    from data_prep.download import DownloadError

    with terminate_as_interrupt():
        try:
            return _ACTIONS[args.action](args)
        except (InputFileError, DownloadError, KeyError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"cpsam prep {args.action}: error: {msg}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"cpsam prep {args.action}: error: {describe_os_error(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            print(f"cpsam prep {args.action}: interrupted by {interrupt_name(exc)}; finished files are complete "
                  "(each is written atomically), rerun the same command to continue", file=sys.stderr)
            return interrupt_exit_code(exc)
