"""`cpsam segment`: segment an image file or a folder of images with any cpsam model.

For every input image NAME.ext it writes, into --output:
  NAME_masks.tif     uint16 (uint32 above 65535 cells) labels, 0 = background
  NAME_seg.npy       the cellpose GUI's file (masks, outlines, flows), see cpsam.io.seg_npy_dict
  NAME_outlines.png  the image with mask outlines in red (written last: it marks a complete set)
Unreadable, empty or malformed files, dangling links, FIFOs and images whose names would collide in
--output are reported one per line and skipped; files that look like outputs of an image beside them
are listed and left alone. Every file is written atomically; an interrupted set (Ctrl-C, SIGTERM, a
full disk) is removed, and --skip-existing resumes a folder run where it stopped.
At the end OUT/summary.csv lists every image once (cpsam.segment_summary).

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each process (rank) segments a disjoint, pixel-balanced
share of the files on its own device (cpsam.shard): rank 0 lists the folder, removes stale temporary files
and applies --skip-existing before any rank writes, then hands out the shares; rank 0 draws one progress bar
over all ranks, merges the ranks' rows into summary.csv and prints the totals. Each image is segmented on its
own (its tiles never share a network call with another image's), so its outputs do not depend on which
images a rank got: N processes write the same bytes as one (with the same device type and threads per
process: CPU kernels round differently with the thread count).
Exit code (per rank; the launcher fails when a rank does): 0 all done, 1 some file failed, 2 usage error (bad
option, unusable --input/--output/--model), 130 Ctrl-C, 143 SIGTERM (128 + the signal number).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpsam import io, shard
from cpsam.blockwise.cli import add_blockwise_arguments, run_blockwise, wants_blockwise
from cpsam.cli_types import finite_float, non_negative_float, non_negative_int, positive_int, torch_device
from cpsam.segment import ImageError, Segmenter, SegmentResult
from cpsam.segment_summary import SummaryRow, merge_rows, write_summary
from cpsam.transforms import channels_ignored, to_channels_last

OUTPUT_SUFFIXES = ("_masks", "_outlines", "_seg", "_flows", "_cp_masks")
OUTPUT_FILES = ("_masks.tif", "_seg.npy", "_outlines.png")  # the last one is written last


# --------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam segment`."""
    parser.add_argument("--model", required=True,
                        help="model file (official cpsam, classic Cellpose, our checkpoint) or a pretrained "
                             "name such as cyto_0")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs (created)")
    parser.add_argument("--diameter", type=non_negative_float, default=0.0,
                        help="typical cell diameter in pixels (0: estimated by the model's size model if it "
                             "has one, else the model's own diameter)")
    parser.add_argument("--channels", type=non_negative_int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="cellpose-3 channels: channel to segment (0 = grayscale, 1..C) and nuclear "
                             "channel (0 = none); default: the first channels of the image")
    parser.add_argument("--channel-axis", type=int, default=None, help="channel axis of 3-D images")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="tiles per network call (default 8)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--bf16", action="store_true", help="run the network in bfloat16")
    parser.add_argument("--augment", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--niter", type=non_negative_int, default=None,
                        help="dynamics steps (default or 0: 200 / rescale)")
    parser.add_argument("--flow-threshold", type=non_negative_float, default=None,
                        help="largest mean squared flow error of a kept mask (default: the model's calibrated "
                             "threshold, recorded by cpsam distill, else 0.4; 0: keep all)")
    parser.add_argument("--cellprob-threshold", type=finite_float, default=0.0)
    parser.add_argument("--min-size", type=int, default=15, help="smallest mask in pixels (<= 0: keep all)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave out images whose output set (masks, _seg.npy, outlines) is complete and "
                             "not older than the image: a rerun continues where a killed run stopped")
    add_blockwise_arguments(parser)


# --------------------------------------------------------------------------- inputs


@dataclass
class InputListing:
    """What `list_inputs` found: images to segment, entries that fail (path, problem) and files left
    alone because they look like outputs of an image beside them (path, why)."""

    images: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def output_paths(out_dir: Path, image: Path) -> list[Path]:
    """NAME_masks.tif, NAME_seg.npy, NAME_outlines.png of one input image (the last is written last)."""
    return [out_dir / f"{image.stem}{suffix}" for suffix in OUTPUT_FILES]


def _output_of(stem: str, stems: set[str]) -> str | None:
    """The image stem whose output `stem` looks like (NAME_masks -> NAME when NAME is an input), else None."""
    for suffix in OUTPUT_SUFFIXES:
        if stem.endswith(suffix) and stem[: -len(suffix)] in stems:
            return stem[: -len(suffix)]
    return None


def list_inputs(path: Path) -> InputListing:
    """The image files to segment: `path` itself, or the entries directly inside a folder (sorted).

    Hidden files and files without an image suffix are passed over in silence. Reported as bad:
    dangling or looping symbolic links, FIFOs and other non-files, and every image of a group whose
    names differ only in the suffix (a.tif, a.png: both would write a_masks.tif). Left alone (listed):
    NAME_seg.npy files, and NAME_masks / _outlines / _seg / _flows / _cp_masks files when NAME is an
    input too (they are its outputs, or would be overwritten by them); a raw cell_masks.tif without
    a cell.* beside it is an image like any other. Raises FileNotFoundError when `path` is neither.
    """
    if path.is_file():
        return InputListing(images=[path])
    if not path.is_dir():
        problem = io.not_a_file_problem(path)
        raise FileNotFoundError(f"{path}: {'no such file or folder' if problem == 'file does not exist' else problem}")
    listing = InputListing()
    candidates: list[Path] = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or entry.suffix.lower() not in io.IMAGE_SUFFIXES:
            continue
        problem = io.not_a_file_problem(entry)
        if problem == "not a regular file (a folder)":
            listing.ignored.append((entry, "a folder"))
        elif problem is not None:
            listing.bad.append((entry, problem))
        elif entry.name.endswith("_seg.npy"):
            listing.ignored.append((entry, "a cellpose _seg.npy file"))
        else:
            candidates.append(entry)
    stems = {p.stem for p in candidates}
    by_stem: dict[str, list[Path]] = {}
    for entry in candidates:
        owner = _output_of(entry.stem, stems)
        if owner is not None:
            listing.ignored.append((entry, f"output of {owner}"))
        else:
            by_stem.setdefault(entry.stem, []).append(entry)
    for stem, group in by_stem.items():
        if len(group) == 1:
            listing.images.append(group[0])
            continue
        for entry in group:
            others = ", ".join(p.name for p in group if p != entry)
            listing.bad.append((entry, f"same name as {others}: both would write {stem}_masks.tif (rename one)"))
    listing.bad.sort()
    return listing


def is_complete(out_dir: Path, image: Path) -> bool:
    """True when the image's three output files exist, none empty, and the last-written one
    (NAME_outlines.png) is not older than the image."""
    try:
        stats = [p.stat() for p in output_paths(out_dir, image)]
        image_mtime = image.stat().st_mtime
    except OSError:
        return False
    return all(s.st_size > 0 for s in stats) and stats[-1].st_mtime >= image_mtime


# --------------------------------------------------------------------------- outputs


def remove_stale_temps(out_dir: Path, images: list[Path]) -> int:
    """Delete the temporary files a killed run (SIGKILL) left for these images' outputs; returns how many."""
    n = 0
    for image in images:
        for target in output_paths(out_dir, image):
            for stale in io.stale_temp_files(target):
                stale.unlink(missing_ok=True)
                n += 1
    return n


def write_outputs(out_dir: Path, path: Path, image: np.ndarray, result: SegmentResult, args) -> None:
    """Write NAME_masks.tif, NAME_seg.npy and NAME_outlines.png; on any failure none of them stays.

    The old NAME_outlines.png is removed first and the new one written last, so a set is complete
    exactly when its outlines file exists (what --skip-existing checks).
    """
    masks_path, seg_path, outlines_path = output_paths(out_dir, path)
    outlines_path.unlink(missing_ok=True)
    written: list[Path] = []
    try:
        # each target is listed before it is written, so an interruption that lands just after a
        # write returns (before the list would grow) still removes that file
        written.append(masks_path)
        io.write_labels(masks_path, result.masks)
        seg = io.seg_npy_dict(result.masks, result.dP, result.cellprob, path.resolve(),
                              channels=args.channels, diameter=result.diameter or None)
        written.append(seg_path)
        io.write_seg_npy(seg_path, seg)
        overlay = io.outline_overlay(image, result.masks, channel_axis=args.channel_axis)
        written.append(outlines_path)
        io.write_png(outlines_path, overlay)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise


def channel_warning(image: np.ndarray, args: argparse.Namespace) -> str | None:
    """Why --channels cannot apply to this image (it has fewer channels than asked), or None."""
    if args.channels is None or image.ndim not in (2, 3):
        return None
    try:
        n_channels = to_channels_last(image, args.channel_axis).shape[-1]
    except ValueError:
        return None  # the segmenter reports the bad channel axis
    return channels_ignored(n_channels, args.channels)


# --------------------------------------------------------------------------- the run


class _StopRun(Exception):
    """Nothing more can be written (disk full, read-only): the run stops after this image."""


@dataclass
class _Run:
    """Counters, messages and summary rows of one `cpsam segment` run (of this rank)."""

    progress: shard.RankProgress
    rank: int = 0
    failures: list[str] = field(default_factory=list)
    rows: list[SummaryRow] = field(default_factory=list)
    n_done: int = 0
    n_cells: int = 0
    mark: float = field(default_factory=time.perf_counter)  # end of the previous image
    summary: list[SummaryRow] = field(default_factory=list)  # rank 0 at the end: the rows of every rank

    def note(self, message: str) -> None:
        """One line on stderr that does not break the progress bar."""
        self.progress.write(f"cpsam segment: {message}", file=sys.stderr)

    def _seconds(self) -> float:
        now = time.perf_counter()
        seconds, self.mark = now - self.mark, now
        return seconds

    def fail(self, path: Path, problem: str, *, counted: bool = True) -> None:
        """Report one skipped input (one line naming it and the problem)."""
        self.failures.append(f"{path}: {problem}")
        self.note(f"skipped {path}: {problem}")
        self.rows.append(SummaryRow(path.name, "failed", seconds=self._seconds() if counted else None,
                                    rank=self.rank))
        if counted:
            self.progress.update()

    def done(self, path: Path, result: SegmentResult) -> None:
        """Count one image whose outputs are written."""
        self.n_done += 1
        self.n_cells += result.n_cells
        self.rows.append(SummaryRow(path.name, "ok", cells=result.n_cells, diameter=float(result.diameter),
                                    seconds=self._seconds(), rank=self.rank))
        self.progress.update()


def _report_listing(listing: InputListing, run: _Run) -> None:
    for path, problem in listing.bad:
        run.fail(path, problem, counted=False)
    if listing.ignored:
        shown = ", ".join(f"{p.name} ({why})" for p, why in listing.ignored[:5])
        more = f" and {len(listing.ignored) - 5} more" if len(listing.ignored) > 5 else ""
        run.note(f"not segmented: {len(listing.ignored)} file(s) that are not input images: {shown}{more}")


def _segment_all(files: list[Path], segmenter: Segmenter, args: argparse.Namespace, run: _Run) -> None:
    """Read, segment and write every file; failures are reported per file, a full disk stops the run."""
    in_flight: deque[tuple[Path, np.ndarray]] = deque()

    def readable_images() -> Iterator[np.ndarray]:
        for path in files:
            try:
                image = io.read_image(path)
            except io.InputFileError as exc:
                run.fail(path, exc.problem)
                continue
            warning = channel_warning(image, args)
            if warning:
                run.note(f"{path}: {warning}")
            in_flight.append((path, image))
            yield image

    def one_by_one() -> Iterator[SegmentResult | ImageError]:
        # one image per iter_segment call: an image's tiles never share a network call with another image's,
        # because CPU (oneDNN) and GPU (cuDNN) kernels round differently with the batch size, and an image's
        # outputs must not depend on its neighbours (a sharded run writes the bytes of a single-process one)
        for image in readable_images():
            yield from segmenter.iter_segment(
                [image], diameter=args.diameter or None, channels=args.channels,
                channel_axis=args.channel_axis, augment=args.augment, niter=args.niter,
                flow_threshold=args.flow_threshold, cellprob_threshold=args.cellprob_threshold,
                min_size=args.min_size, skip_errors=True,
            )

    run.mark = time.perf_counter()
    for result in one_by_one():
        path, image = in_flight.popleft()
        if isinstance(result, ImageError):
            run.fail(path, str(result))
            continue
        if result.diameter_source == "size model":
            run.progress.write(f"{path.stem}: estimated diameter {result.diameter:.1f} px", file=sys.stderr)
        try:
            write_outputs(args.output, path, image, result, args)
        except OSError as exc:
            run.fail(path, f"cannot write outputs ({io.describe_os_error(exc)})")
            if io.is_storage_error(exc):
                raise _StopRun(io.describe_os_error(exc)) from exc
            continue
        run.done(path, result)


def _prepare_inputs(args: argparse.Namespace, share: tuple[int, int] | None = None
                    ) -> tuple[InputListing, list[Path]] | int:
    """List the inputs and check --output; returns (listing, files to segment) or an exit code.

    share=(rank, world_size): only that rank's `shard.shard_files` share of the images is cleaned of stale
    temporary files, checked by --skip-existing and returned (ranks that plan on their own, without a group).
    """
    try:
        listing = list_inputs(args.input)
    except FileNotFoundError as exc:
        print(f"cpsam segment: {exc}", file=sys.stderr)
        return 2
    if not listing.images and not listing.bad:
        print(f"cpsam segment: no image files ({', '.join(io.IMAGE_SUFFIXES)}) in {args.input}", file=sys.stderr)
        return 2
    try:
        io.check_output_dir(args.output)
    except io.OutputPathError as exc:
        print(f"cpsam segment: --output {exc}", file=sys.stderr)
        return 2
    images = listing.images if share is None else shard.shard_files(listing.images, share[1])[share[0]]
    remove_stale_temps(args.output, images)
    files = images
    if args.skip_existing:
        files = [p for p in files if not is_complete(args.output, p)]
        if len(files) < len(images):
            print(f"cpsam segment: --skip-existing: {len(images) - len(files)} of {len(images)} "
                  "images already have a complete output set", file=sys.stderr)
    return listing, files


@dataclass
class _Plan:
    """What rank 0 decided before any rank writes: the listing, the images --skip-existing leaves out and
    each rank's share of the rest (or the exit code of a usage error, the same for every rank)."""

    code: int | None = None
    listing: InputListing | None = None
    skipped: list[Path] = field(default_factory=list)
    shares: list[list[Path]] = field(default_factory=list)


def _make_plan(args: argparse.Namespace, world_size: int, own_rank: int | None = None) -> _Plan:
    """The whole run's plan (made by rank 0 of a group), or with `own_rank` the plan of that rank alone: its
    share of the listing (the same split for every rank), cleaned and --skip-existing-checked by itself."""
    prepared = _prepare_inputs(args, None if own_rank is None else (own_rank, world_size))
    if isinstance(prepared, int):
        return _Plan(code=prepared)
    listing, files = prepared
    todo = set(files)
    if own_rank is None:  # one process: no split, so no file header is read for the sizes
        mine, shares = listing.images, [files] if world_size == 1 else shard.shard_files(files, world_size)
    else:
        mine = shard.shard_files(listing.images, world_size)[own_rank]
        shares = [files if r == own_rank else [] for r in range(world_size)]
    return _Plan(listing=listing, skipped=[p for p in mine if p not in todo], shares=shares)


def _run(args: argparse.Namespace, run_holder: list[_Run], ctx: shard.RankContext | None = None,
         group: bool = True) -> int:
    """One rank's run. `ctx` None: the launcher's placement (environment). group=False: a rank of a split
    without torch.distributed (e.g. a job array): it plans its own share and writes no summary.csv."""
    ctx = ctx or shard.RankContext.from_env()
    if not group:
        return _run_rank(args, run_holder, ctx, alone=True)
    with shard.process_group(ctx):
        return _run_rank(args, run_holder, ctx)


def _run_rank(args: argparse.Namespace, run_holder: list[_Run], ctx: shard.RankContext, alone: bool = False) -> int:
    # rank 0 lists, cleans stale temporary files and checks --skip-existing while the others wait here, so no
    # rank removes a temporary file another rank is writing and every rank sees the same file list
    if alone:
        plan = _make_plan(args, ctx.world_size, own_rank=ctx.rank)
    else:
        plan = shard.broadcast_from_main(ctx, _make_plan(args, ctx.world_size) if ctx.is_main else None)
    if plan.code is not None:
        return plan.code
    assert plan.listing is not None
    files = plan.shares[ctx.rank]
    total = sum(len(share) for share in plan.shares)
    device = ctx.device(args.device)
    run = _Run(progress=shard.RankProgress(ctx, total, unit="image", desc="cpsam segment"), rank=ctx.rank)
    run_holder.append(run)
    if ctx.is_main:  # the folder's bad and ignored entries: reported once, by rank 0
        _report_listing(plan.listing, run)
        if ctx.distributed:
            run.note(f"{ctx.world_size} processes, {total} images to segment, {len(files)} on rank {ctx.rank}")
    if ctx.is_main or alone:  # the planner's rows: in a group, rank 0's
        run.rows += [SummaryRow(p.name, "skipped-existing", rank=ctx.rank) for p in plan.skipped]
    start = time.perf_counter()
    stopped = ""
    segmenter, load_error = None, None
    if files:
        try:
            # here, not at the top: cpsam.models loads segment_anything (seconds), and the option validators of
            # this module are imported by other commands' parsers
            from cpsam.models import resolve_model

            model = resolve_model(args.model, device)
            segmenter = Segmenter(model, device=device, batch_size=args.batch_size, bf16=args.bf16)
        except (OSError, ValueError, RuntimeError) as exc:
            load_error = str(exc)
    # every rank learns whether every rank has its model: a rank that cannot load it (its device, its copy of
    # the file) stops them all now instead of leaving the others waiting for it at the final gather
    errors = shard.gather_to_all(ctx, load_error) if not alone else [load_error]
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        run.progress.close()
        if load_error is not None:
            print(f"cpsam segment: cannot load the model: {load_error}", file=sys.stderr)
        elif ctx.is_main:
            print(f"cpsam segment: rank {failed[0][0]} cannot load the model ({failed[0][1]}); every rank stops",
                  file=sys.stderr)
        return 2
    if segmenter is not None:
        try:
            _segment_all(files, segmenter, args, run)
        except _StopRun as exc:
            attempted = {row.file for row in run.rows}
            left = [p for p in files if p.name not in attempted]
            run.rows += [SummaryRow(p.name, "not-attempted", rank=ctx.rank) for p in left]
            stopped = f"; stopped early, {len(left)} images not attempted: {exc}"
    seconds = time.perf_counter() - start
    parts = shard.gather_to_main(ctx, (run.rows, run.n_done, run.n_cells, len(run.failures), stopped))
    run.progress.close()
    if parts is not None:  # rank 0 (or a rank alone)
        run.summary = merge_rows(part[0] for part in parts)
        try:
            if not (alone and ctx.distributed):  # a rank alone knows only its share
                write_summary(args.output, run.summary)
        except OSError as exc:
            run.note(f"cannot write {args.output / 'summary.csv'} ({io.describe_os_error(exc)})")
            run.failures.append("summary.csv")
        n_done, n_cells = sum(p[1] for p in parts), sum(p[2] for p in parts)
        n_failed = sum(p[3] for p in parts)
        stopped = "".join(p[4] for p in parts)
        print(f"cpsam segment: {n_done} images, {n_cells} cells, {seconds:.1f} s"
              f" ({n_done / seconds if seconds > 0 else 0:.2f} images/s), {n_failed} failed"
              f" -> {os.fspath(args.output)}{stopped}")
    # the summary is complete before any rank exits: a launcher stops the others when one rank exits with 1
    shard.barrier(ctx)
    return 1 if run.failures else 0


def run(args: argparse.Namespace) -> int:
    """Segment every input image; returns the process exit code (see the module docstring)."""
    if wants_blockwise(args):  # one image larger than memory: cpsam.blockwise
        return run_blockwise(args)
    holder: list[_Run] = []
    with io.terminate_as_interrupt():
        try:
            return _run(args, holder)
        except KeyboardInterrupt as exc:
            done = holder[0].n_done if holder else 0
            if holder:
                holder[0].progress.close()
            print(f"cpsam segment: interrupted by {io.interrupt_name(exc)} after {done} images; the image in "
                  "progress left no output (rerun with --skip-existing to continue)", file=sys.stderr)
            return io.interrupt_exit_code(exc)
