"""`segment_files`: `cpsam segment` from Python, on one process, on every rank of a launched group, or on one
rank of a split that runs without torch.distributed (a job array).

    from cpsam.segment_files import segment_files

    rows = segment_files("cyto_0", "images/", "out/", diameter=17)               # one process, or every rank
    rows = segment_files("cyto_0", "images/", "out/", rank=3, world_size=8)      # task 3 of an 8-task array

It runs the command's own code path (`cpsam.segment_cli`): the same outputs per image, the same
`cpsam.shard` split, the same summary rows (`cpsam.segment_summary`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from cpsam import io, segment_cli
from cpsam.blockwise.cli import BLOCKWISE_ONLY
from cpsam.segment_summary import SummaryRow
from cpsam.shard import RankContext


class SegmentFilesError(RuntimeError):
    """The run could not start or was stopped (a usage error, a model that cannot be loaded, an interruption);
    `code` is the exit code `cpsam segment` would return. The reason was printed on stderr."""

    def __init__(self, code: int) -> None:
        super().__init__(f"cpsam segment stopped with exit code {code} (the reason is on stderr)")
        self.code = code


def segment_files(
    model: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    **options: Any,
) -> list[SummaryRow]:
    """Segment an image file or every image of a folder into `output`, like `cpsam segment`.

    Args:
        model: a pretrained name, a weight file or a run folder (`cpsam segment --model`).
        input: an image file or a folder of images.
        output: the output folder (NAME_masks.tif, NAME_seg.npy, NAME_outlines.png per image, summary.csv).
        rank, world_size: this process's part of a split run without torch.distributed: it segments its
            `cpsam.shard.shard_files` share of the folder, cleans and checks only that share, and writes no
            summary.csv (its rows are returned; merge them with `cpsam.segment_summary.write_summary`).
            None (both): the launcher's placement (WORLD_SIZE / RANK / LOCAL_RANK of torchrun or accelerate,
            which also start the process group), else one process.
        options: the command's other options by their names with underscores (diameter, channels,
            channel_axis, batch_size, device, bf16, augment, niter, flow_threshold, cellprob_threshold,
            min_size, skip_existing); values are used as given (not parsed).

    Returns the summary rows: on rank 0 of a group (or one process) every rank's, sorted by file; on the
    other ranks of a group and on a rank of a split, that rank's own. Per-file failures are rows with status
    "failed" (their reasons are printed on stderr). Raises SegmentFilesError when the run cannot start or is
    interrupted, ValueError for an unknown option or an incomplete rank / world_size pair.
    """
    parser = argparse.ArgumentParser(prog="cpsam segment", add_help=False)
    segment_cli.add_arguments(parser)
    args = parser.parse_args(["--model", os.fspath(model), "--input", os.fspath(input),
                              "--output", os.fspath(output)])
    for name, value in options.items():
        if name in ("blockwise", *BLOCKWISE_ONLY):
            raise ValueError(f"segment_files: {name!r} is an option of one image larger than memory: use "
                             "cpsam.blockwise.segment_blockwise")
        if name in ("model", "input", "output") or not hasattr(args, name):
            raise ValueError(f"segment_files: unknown option {name!r}")
        setattr(args, name, value)
    if isinstance(args.device, str):
        args.device = torch.device(args.device)
    if (rank is None) != (world_size is None):
        raise ValueError("segment_files: give both rank and world_size, or neither")
    holder: list[segment_cli._Run] = []
    with io.terminate_as_interrupt():
        try:
            if rank is None:
                code = segment_cli._run(args, holder)
            else:
                code = segment_cli._run(args, holder, RankContext(rank=rank, world_size=world_size or 1),
                                        group=False)
        except KeyboardInterrupt as exc:
            raise SegmentFilesError(io.interrupt_exit_code(exc)) from exc
    if code not in (0, 1) or not holder:
        raise SegmentFilesError(code)
    run = holder[0]
    return run.summary or sorted(run.rows, key=lambda r: r.file)
