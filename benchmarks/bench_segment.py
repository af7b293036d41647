"""Segmentation throughput: cross-image tile batching vs one image at a time vs the cellpose package.

    python -m benchmarks.bench_segment                      # cyto_0 (classic CPnet) on 16 real images
    python -m benchmarks.bench_segment --model cpsam.pt     # an official Cellpose-SAM file
    python -m benchmarks.bench_segment --device cuda --batch-size 64

Images: 16 real images from ../shared/data (every folder, grayscale and RGB), centre-cropped to
--crop pixels (0 keeps them whole). Every mode runs the same weights on the same images, after one
warm-up pass over the images, and includes normalization, tiling, the network and the dynamics (masks):

- batched:   `Segmenter.segment(images)`: tiles of consecutive images share network batches.
- one-by-one: `Segmenter.segment([image])` per image (what cellpose does with a list).
- cellpose:  the cellpose 4.2.1.1 package: `CellposeModel.eval(list)` for a Cellpose-SAM file; for a
             classic CPnet (cellpose 4 cannot load those) its own `normalize_img` -> `core.run_net`
             (224 tiles) -> `dynamics.resize_and_compute_masks`, image by image, with our CPnet.
The modes are timed in turn, `--rounds` times over (first mode of a round alternating), and the
median rate per mode is reported (the first pass after the warm-up can be slower whatever the mode).
Prints images/s per mode, the ratios, and the AP@0.5 agreement of our
masks with cellpose's.
Rules (`--rules`): our Segmenter runs a classic CPnet under cellpose 3.1.1.2's rules by default
(tiles shrink to images smaller than a tile, cellpose 3's flow -> mask rules); the only cellpose
installed is 4.2, whose pipeline pads small images to a full tile and uses its own mask rules. The
default, `--rules cp4`, runs our Segmenter under cellpose 4's rules as well (like for like: same
algorithm, identical masks). `--rules auto` keeps each model's own rules: a CPnet then differs from
cellpose 4 on images narrower than a tile (CPnet's style vector averages over cellpose 4's padding).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cpsam import io
from cpsam.cli_types import positive_int
from cpsam.segment import InferenceRules, Segmenter, rules_for

SHARED = Path(__file__).resolve().parents[2] / "shared"


def bench_images(data_dir: Path, n: int = 16, crop: int = 256) -> list[tuple[str, np.ndarray]]:
    """`n` real images, round-robin over the dataset folders (sorted), centre-cropped to crop x crop."""
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("_"))
    per_folder = [sorted(f.glob("*_img.tif")) for f in folders]
    picked: list[Path] = []
    while len(picked) < n and any(per_folder):
        for files in per_folder:
            if files and len(picked) < n:
                picked.append(files.pop(0))
    out = []
    for path in picked:
        image = io.read_image(path)
        if crop:
            y0 = max(0, (image.shape[0] - crop) // 2)
            x0 = max(0, (image.shape[1] - crop) // 2)
            image = image[y0 : y0 + crop, x0 : x0 + crop]
        out.append((path.name[: -len("_img.tif")], np.ascontiguousarray(image)))
    return out


class _CellposeCompatible(nn.Module):
    """Our CPnet seen through cellpose's `core.run_net` (it reads .device/.dtype, uses outputs [:2])."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)[:2]


def cellpose_runner(model: nn.Module, model_path: str | None, device: torch.device, batch_size: int,
                    bf16: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A function image -> masks that runs the cellpose package (see module docstring)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cellpose import core, dynamics
    from cellpose import transforms as cp_transforms

    from cpsam.models.cpnet import CPnet

    if not isinstance(model, CPnet):
        # imported in the process that runs this measurement only (each side starts fresh)
        from cellpose.models import CellposeModel

        reference = CellposeModel(pretrained_model=model_path, device=device, use_bfloat16=bf16)
        return lambda image: reference.eval(image, batch_size=batch_size)[0]

    net = _CellposeCompatible(model).to(device).eval()
    nchan = int(model.in_channels)

    def run(image: np.ndarray) -> np.ndarray:
        x = cp_transforms.convert_image(image)[..., :nchan]
        if x.shape[-1] < nchan:  # cellpose 3 puts grayscale in channel 0 and zeros after it
            x = np.concatenate([x, np.zeros((*x.shape[:2], nchan - x.shape[-1]), x.dtype)], axis=-1)
        x = cp_transforms.normalize_img(x.astype(np.float32), axis=-1)[None]
        yf, _ = core.run_net(net, x, batch_size=batch_size, bsize=int(model.tile_size), tile_overlap=0.1)
        dP, cellprob = yf[0, ..., :2].transpose(2, 0, 1), yf[0, ..., 2]
        return dynamics.resize_and_compute_masks(dP, cellprob, niter=200, device=device)

    return run


def timed(fn: Callable[[], list[np.ndarray]], n_images: int) -> tuple[float, list[np.ndarray]]:
    """(images per second, masks) of one pass of `fn` over `n_images` images."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    masks = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n_images / (time.perf_counter() - start), masks


def cellpose4_rules(model: nn.Module) -> InferenceRules:
    """Our Segmenter under cellpose 4.2's pipeline rules: small images padded to a full tile,
    float64 diameter arithmetic, cellpose 4's flow -> mask rules (tile size: the model's own)."""
    return dataclasses.replace(rules_for(model), pad_to_tile=True, float32_rescale=False, mask_rules="cp4")


def run_rounds(modes: dict[str, Callable[[], list[np.ndarray]]], n_images: int, rounds: int
               ) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """Time every mode `rounds` times, in turn, the first mode of each round alternating.

    Returns the median images/s per mode and the masks of each mode's last pass.
    """
    names = list(modes)
    rates: dict[str, list[float]] = {name: [] for name in names}
    masks: dict[str, list[np.ndarray]] = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            rate, masks[name] = timed(modes[name], n_images)
            rates[name].append(rate)
            print(f"  round {r + 1}: {name:>11} {rate:7.3f} images/s", flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}, masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "weights" / "cyto_0_cpnet_torch.pt"),
                        help="weight file (classic Cellpose, official cpsam, ours); default: shared cyto_0")
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="the shared real-image folder")
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256, help="centre crop side in pixels (0: whole images)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--skip-cellpose", action="store_true")
    parser.add_argument("--rules", choices=("cp4", "auto"), default="cp4",
                        help="our Segmenter's rules: cp4 = cellpose 4's tiling and mask rules, like the "
                             "cellpose runs (default); auto = the model's own (cellpose 3's for a CPnet)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed passes per mode (median reported)")
    args = parser.parse_args(argv)

    # imported in the process that runs this measurement only (each side starts fresh)
    from cellpose.metrics import average_precision

    from cpsam.models.loading import load_model

    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    images = bench_images(args.data, args.n_images, args.crop)
    arrays = [image for _, image in images]
    rules = cellpose4_rules(model) if args.rules == "cp4" else rules_for(model)
    seg = Segmenter(model, device=device, batch_size=args.batch_size, bf16=args.bf16, rules=rules)
    size = f"cropped to {args.crop} px" if args.crop else "whole"
    print(f"model {args.model} ({type(model).__name__}), device {device}, batch_size {args.batch_size}, "
          f"{len(arrays)} images {size}, rules {args.rules} ({rules}), "
          f"torch threads {torch.get_num_threads()}")

    print("warm-up pass over every image (not timed) ...", flush=True)
    # Warm-up over every image: the first call on each tile shape builds its convolution kernels
    # (oneDNN primitives), which would otherwise be charged to whichever mode runs first.
    seg.segment(arrays)
    modes: dict[str, Callable[[], list[np.ndarray]]] = {
        "batched": lambda: [r.masks for r in seg.segment(arrays)],
        "one-by-one": lambda: [seg.segment([a])[0].masks for a in arrays],
    }
    if not args.skip_cellpose:
        runner = cellpose_runner(model, args.model, device, args.batch_size, args.bf16)
        for array in arrays:  # the same warm-up for cellpose
            runner(array)
        modes["cellpose"] = lambda: [runner(a) for a in arrays]
    rates, masks = run_rounds(modes, len(arrays), args.rounds)
    ours, single, theirs = masks["batched"], masks["one-by-one"], masks.get("cellpose")
    agreement = np.mean([average_precision([a], [b], threshold=[0.5])[0][0, 0] if a.max() or b.max() else 1.0
                         for a, b in zip(ours, single, strict=True)])

    print(f"median of {args.rounds} rounds:")
    for mode, rate in rates.items():
        print(f"{mode:>11}: {rate:7.3f} images/s")
    print(f"batched / one-by-one: {rates['batched'] / rates['one-by-one']:.2f}x "
          f"(masks AP@0.5 between them {agreement:.3f})")
    if theirs is not None:
        ap = np.mean([average_precision([t], [o], threshold=[0.5])[0][0, 0] if t.max() or o.max() else 1.0
                      for t, o in zip(theirs, ours, strict=True)])
        print(f"batched / cellpose: {rates['batched'] / rates['cellpose']:.2f}x, "
              f"one-by-one / cellpose: {rates['one-by-one'] / rates['cellpose']:.2f}x "
              f"(masks AP@0.5 vs cellpose {ap:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
