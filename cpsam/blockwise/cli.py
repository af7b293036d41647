"""`cpsam segment --blockwise`: one image larger than memory -> OUT.zarr (see `cpsam.blockwise.run`).

    cpsam segment --blockwise --model M --input BIG.zarr|BIG.tif --output OUT.zarr [--block-size PX]
        [--workers N [--[no-]worker-processes] | --dask-scheduler ADDRESS] [--diameter D] [--channels SEG NUC]
        [--bigtiff PATH]

The options are declared with the others in `cpsam.segment_cli.add_arguments`; `cpsam.segment_cli.run` hands
the parsed arguments here when --blockwise (or one of its options) is given.
Exit codes: 0 done; 2 usage (options, unknown format, not 2-D, block smaller than 4 diameters, output exists,
model not loadable); 1 a data / IO error while running; 130 / 143 interrupted (rerun the command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cpsam import io
from cpsam.blockwise.blocks import BlockSizeError
from cpsam.blockwise.run import DEFAULT_BLOCK_SIZE, ModelLoadError, OutputExistsError, segment_blockwise
from cpsam.blockwise.source import SourceError
from cpsam.segment import ImageError

BLOCKWISE_ONLY = ("block_size", "workers", "dask_scheduler", "bigtiff", "worker_processes")
PREFIX = "cpsam segment"


def add_blockwise_arguments(parser: argparse.ArgumentParser) -> None:
    """The --blockwise options (called by `cpsam.segment_cli.add_arguments`)."""
    from cpsam.cli_types import positive_int  # the shared option types

    group = parser.add_argument_group("images larger than memory (--blockwise)")
    group.add_argument("--blockwise", action="store_true",
                       help="segment one large zarr / OME-Zarr / TIFF image block by block into an OUT.zarr "
                            "(dask; resumable: repeat the command to continue)")
    group.add_argument("--block-size", type=positive_int, default=None, metavar="PX",
                       help=f"block side in pixels (default {DEFAULT_BLOCK_SIZE}; at least 4 cell diameters)")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="local dask workers (default: one per GPU, else 2 CPU workers)")
    group.add_argument("--worker-processes", action=argparse.BooleanOptionalAction, default=None,
                       help="local workers as separate processes (default: yes with GPUs, one per GPU; on a CPU "
                            "they are threads of this process sharing one copy of the model)")
    group.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                       help="address of a running dask scheduler (e.g. tcp://host:8786) instead of local workers")
    group.add_argument("--bigtiff", default=None, metavar="PATH",
                       help="also write the labels to this tiled BigTIFF")


def wants_blockwise(args: argparse.Namespace) -> bool:
    """True when --blockwise or one of its options was given (`run_blockwise` then checks them)."""
    return bool(getattr(args, "blockwise", False)) or any(getattr(args, n, None) is not None for n in BLOCKWISE_ONLY)


def _usage(message: str) -> int:
    print(f"{PREFIX}: {message}", file=sys.stderr)
    return 2


def run_blockwise(args: argparse.Namespace) -> int:
    """Run `cpsam segment --blockwise` with parsed arguments; returns the exit code."""
    if not args.blockwise:
        given = [f"--{name.replace('_', '-')}" for name in BLOCKWISE_ONLY if getattr(args, name) is not None]
        return _usage(f"{', '.join(given)} only apply with --blockwise")
    if args.workers is not None and args.dask_scheduler is not None:
        return _usage("give --workers or --dask-scheduler, not both")
    if args.worker_processes is not None and args.dask_scheduler is not None:
        return _usage("--worker-processes applies to local workers, not to --dask-scheduler")
    if args.skip_existing:
        return _usage("--skip-existing does not apply to --blockwise (repeating the command resumes it)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same OUT.zarr
        return _usage("--blockwise runs on dask workers, not under torchrun / accelerate launch; run one process "
                      "with --workers N or --dask-scheduler ADDRESS")
    if args.bigtiff is not None:  # refused now, not after the whole segmentation
        try:
            io.check_output_dir(Path(args.bigtiff).parent)
        except io.OutputPathError as exc:
            return _usage(f"--bigtiff {exc}")
    if args.input.is_dir() and args.input.suffix.lower() != ".zarr" and not any(
            (args.input / n).exists() for n in ("zarr.json", ".zarray", ".zgroup")):
        return _usage(f"--input {args.input}: --blockwise takes one image (a zarr folder or a TIFF), not a folder")
    try:
        with io.terminate_as_interrupt():
            result = segment_blockwise(
                args.model, args.input, args.output, block_size=args.block_size or DEFAULT_BLOCK_SIZE,
                diameter=args.diameter, channels=args.channels, channel_axis=args.channel_axis,
                workers=args.workers, scheduler_address=args.dask_scheduler, processes=args.worker_processes,
                device=None if args.device is None else str(args.device), batch_size=args.batch_size,
                bf16=args.bf16, augment=args.augment, niter=args.niter, flow_threshold=args.flow_threshold,
                cellprob_threshold=args.cellprob_threshold, min_size=args.min_size, bigtiff=args.bigtiff,
            )
    except SourceError as exc:
        return _usage(f"--input {exc}")
    except BlockSizeError as exc:
        return _usage(f"--block-size: {exc}")
    except OutputExistsError as exc:
        return _usage(f"--output {exc}")
    except io.OutputPathError as exc:
        return _usage(f"--output {exc}")
    except ModelLoadError as exc:
        return _usage(str(exc))
    except ImageError as exc:
        print(f"{PREFIX}: {args.input}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{PREFIX}: interrupted by {io.interrupt_name(exc)}; the blocks done are kept in {args.output} "
              "(repeat the command to resume)", file=sys.stderr)
        return io.interrupt_exit_code(exc)
    except OSError as exc:  # a full disk, lost permissions, a scheduler that cannot be reached
        where = f"--dask-scheduler {args.dask_scheduler}: " if args.dask_scheduler and not exc.filename else ""
        print(f"{PREFIX}: {where}{io.describe_os_error(exc)}; the blocks done are kept in {args.output} (repeat "
              "the command to resume)", file=sys.stderr)
        return 1
    except Exception as exc:
        # imported here: dask.distributed loads only for blockwise runs (CLI start-up time)
        from distributed import KilledWorker

        if not isinstance(exc, KilledWorker):
            raise
        print(f"{PREFIX}: a dask worker died while segmenting ({exc}); likely out of memory: a smaller --block-size "
              f"or fewer --workers; the blocks done are kept in {args.output} (repeat to resume)", file=sys.stderr)
        return 1
    print(f"{PREFIX}: {result.shape[0]}x{result.shape[1]} image, {result.n_blocks} blocks "
          f"({result.blocks_reused} resumed), {result.n_objects} cells, diameter {result.diameter:.1f} px, "
          f"{result.seconds:.1f} s -> {args.output}")
    return 0
