"""`cpsam segment`: segment an image file or a folder of images with any cpsam model.

For every input image NAME.ext it writes, into --output:
  NAME_masks.tif     uint16 (uint32 above 65535 cells) labels, 0 = background
  NAME_seg.npy       the cellpose GUI's file (masks, outlines, flows), see cpsam.io.seg_npy_dict
  NAME_outlines.png  the image with mask outlines in red
Unreadable, empty or malformed files are reported one per line and skipped; the exit code is 1
if any file failed, 2 for a usage error, 0 otherwise. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cpsam import io
from cpsam.segment import ImageError, Segmenter, SegmentResult

OUTPUT_SUFFIXES = ("_masks", "_outlines", "_seg", "_flows", "_cp_masks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam segment`."""
    parser.add_argument("--model", required=True,
                        help="model file (official cpsam, classic Cellpose, our checkpoint) or a pretrained "
                             "name such as cyto_0")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs (created)")
    parser.add_argument("--diameter", type=float, default=0.0,
                        help="typical cell diameter in pixels (0: the model's own, no rescaling)")
    parser.add_argument("--channels", type=int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="cellpose-3 channels: channel to segment (0 = grayscale, 1..C) and nuclear "
                             "channel (0 = none); default: the first channels of the image")
    parser.add_argument("--channel-axis", type=int, default=None, help="channel axis of 3-D images")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network call (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--bf16", action="store_true", help="run the network in bfloat16")
    parser.add_argument("--augment", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--niter", type=int, default=None, help="dynamics steps (default 200 / rescale)")
    parser.add_argument("--flow-threshold", type=float, default=0.4)
    parser.add_argument("--cellprob-threshold", type=float, default=0.0)
    parser.add_argument("--min-size", type=int, default=15)


def list_inputs(path: Path) -> list[Path]:
    """The image files to segment: `path` itself, or the images directly inside a folder (sorted),
    leaving out hidden files and our own outputs (NAME_masks.tif, NAME_seg.npy, ...)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in io.IMAGE_SUFFIXES
        and not p.stem.endswith(OUTPUT_SUFFIXES)
    )


def resolve_model(spec: str, device: torch.device) -> torch.nn.Module:
    """A model file path (any format `cpsam.models.loading.load_model` knows) or a pretrained name."""
    from cpsam.models.pretrained import list_pretrained, pretrained

    if Path(spec).is_file():
        from cpsam.models.loading import load_model

        return load_model(spec, device=device)
    if spec in list_pretrained():
        return pretrained(spec, device=device)
    known = ", ".join(list_pretrained())
    raise FileNotFoundError(f"--model {spec!r} is neither a file nor a pretrained name ({known})")


def write_outputs(out_dir: Path, path: Path, image: np.ndarray, result: SegmentResult, args) -> None:
    """Write NAME_masks.tif, NAME_seg.npy and NAME_outlines.png; on any failure none of them stays."""
    name = path.stem
    targets = [out_dir / f"{name}_masks.tif", out_dir / f"{name}_seg.npy", out_dir / f"{name}_outlines.png"]
    written: list[Path] = []
    try:
        written.append(io.write_labels(targets[0], result.masks))
        seg = io.seg_npy_dict(result.masks, result.dP, result.cellprob, path.resolve(),
                              channels=args.channels, diameter=args.diameter)
        written.append(io.write_seg_npy(targets[1], seg))
        overlay = io.outline_overlay(image, result.masks, channel_axis=args.channel_axis)
        written.append(io.write_png(targets[2], overlay))
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Segment every input image; returns the process exit code."""
    try:
        files = list_inputs(args.input)
    except FileNotFoundError as exc:
        print(f"cpsam segment: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"cpsam segment: no image files ({', '.join(io.IMAGE_SUFFIXES)}) in {args.input}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = resolve_model(args.model, device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"cpsam segment: cannot load the model: {exc}", file=sys.stderr)
        return 2
    segmenter = Segmenter(model, device=device, batch_size=args.batch_size, bf16=args.bf16)
    args.output.mkdir(parents=True, exist_ok=True)

    failures: list[str] = []
    in_flight: deque[tuple[Path, np.ndarray]] = deque()
    progress = tqdm(total=len(files), unit="image", desc="cpsam segment", file=sys.stderr)

    def fail(path: Path, problem: str) -> None:
        failures.append(f"{path}: {problem}")
        progress.write(f"cpsam segment: skipped {path}: {problem}", file=sys.stderr)
        progress.update()

    def readable_images() -> Iterator[np.ndarray]:
        for path in files:
            try:
                image = io.read_image(path)
            except io.InputFileError as exc:
                fail(path, exc.problem)
                continue
            in_flight.append((path, image))
            yield image

    start = time.perf_counter()
    n_done = n_cells = 0
    results = segmenter.iter_segment(
        readable_images(), diameter=args.diameter or None, channels=args.channels,
        channel_axis=args.channel_axis, augment=args.augment, niter=args.niter,
        flow_threshold=args.flow_threshold, cellprob_threshold=args.cellprob_threshold,
        min_size=args.min_size, skip_errors=True,
    )
    for result in results:
        path, image = in_flight.popleft()
        if isinstance(result, ImageError):
            fail(path, str(result))
            continue
        try:
            write_outputs(args.output, path, image, result, args)
        except OSError as exc:
            fail(path, f"cannot write outputs ({exc})")
            continue
        n_done += 1
        n_cells += result.n_cells
        progress.update()
    progress.close()
    seconds = time.perf_counter() - start
    print(f"cpsam segment: {n_done} images, {n_cells} cells, {seconds:.1f} s"
          f" ({n_done / seconds if seconds > 0 else 0:.2f} images/s), {len(failures)} failed"
          f" -> {os.fspath(args.output)}")
    return 1 if failures else 0
