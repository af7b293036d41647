"""`cpsam demo --quick`: segment sample images that any fresh machine can obtain, and score them.
(`cpsam demo` without --quick runs the whole study: eval/study.py.)

Model: Cellpose's original 2020 "cyto" network (`cpsam.models.pretrained("cyto_0")`, GPL-3.0,
downloaded once from PyPI inside the `cellpose==0.0.1` wheel). Images:

- synthetic fluorescence and phase-contrast cells with their masks (`data_prep.synthetic`);
- the real nuclei image of the 2018 Data Science Bowl that the `stardist` wheel ships
  (`stardist/data/images/img2d.tif` + `mask2d.tif`; Caicedo et al., Nature Methods 2019),
  read from the installed package's files when stardist is installed (a dev dependency).

Writes NAME_masks.tif and NAME_outlines.png per image into --out and prints a table: image,
source, size, cells found, true cells, AP@0.5, and the total time. `--self-check` instead builds
every model variant and runs a tile through it (cpsam.selfcheck).

This lives in `eval` (not `cpsam`) because it uses `data_prep` (synthetic cells); `cpsam` never
imports it (arrows point down).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cpsam.io import outline_overlay, write_labels, write_png
from cpsam.metrics import average_precision
from cpsam.segment import Segmenter
from data_prep.synthetic import SyntheticConfig, synthesize
from eval import study
from eval.samples import Sample, stardist_nuclei_sample

SYNTHETIC_DIAMETER = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam demo`."""
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network call")
    parser.add_argument("--self-check", action="store_true",
                        help="only build every model variant and run one tile through it")
    parser.add_argument("--models", help="with --self-check: comma-separated subset of model names")
    parser.add_argument("--quick", action="store_true",
                        help="the one-minute version: segment sample images with cyto_0 and score them")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="the study: multiply the training epochs (default 1: about 10 minutes on 2 CPU cores)")


def synthetic_samples() -> list[Sample]:
    """Three fluorescence-like and two phase-like synthetic images (384 x 384, ~30 px cells)."""
    samples = []
    for modality, seeds in (("fluorescence", (0, 1, 2)), ("phase", (0, 1))):
        cfg = SyntheticConfig(shape=(384, 384), diameter=SYNTHETIC_DIAMETER, modality=modality)
        for seed in seeds:
            image, masks = synthesize(cfg, seed=seed)
            samples.append(Sample(f"synthetic_{modality}_{seed}", f"data_prep.synthetic ({modality})",
                                  image, masks, SYNTHETIC_DIAMETER))
    return samples


def run_demo(out: Path, device: str, batch_size: int) -> list[dict]:
    """Segment every sample with cyto_0, write masks and overlays into `out`; returns one row per image."""
    from cpsam.models import pretrained  # segment_anything (seconds) loads when the demo runs, not for --help

    samples = synthetic_samples()
    nuclei = stardist_nuclei_sample()
    if nuclei is not None:
        samples.append(nuclei)
    else:
        print("stardist is not installed: the real DSB 2018 nuclei sample is skipped (pip install stardist)")

    model = pretrained("cyto_0", device=device)
    segmenter = Segmenter(model, device=device, batch_size=batch_size)
    start = time.perf_counter()
    stream = segmenter.iter_segment([s.image for s in samples], diameter=[s.diameter for s in samples],
                                    channels=[0, 0])
    results = list(tqdm(stream, total=len(samples), unit="image", desc="cpsam demo", file=sys.stderr))
    seconds = time.perf_counter() - start

    rows = []
    for sample, result in zip(samples, results, strict=True):
        write_labels(out / f"{sample.name}_masks.tif", result.masks)
        write_png(out / f"{sample.name}_outlines.png", outline_overlay(sample.image, result.masks))
        ap = true_cells = None
        if sample.masks is not None:
            ap = float(average_precision(sample.masks, result.masks, thresholds=[0.5])[0][0])
            true_cells = int(np.count_nonzero(np.unique(sample.masks)))
        rows.append(dict(image=sample.name, source=sample.source, size="x".join(map(str, result.masks.shape)),
                         cells=result.n_cells, true_cells=true_cells, ap50=ap))
    rows.append(dict(seconds=seconds))
    return rows


def print_table(rows: list[dict]) -> None:
    seconds = rows[-1]["seconds"]
    images = rows[:-1]
    print(f"\n{'image':26s} {'source':36s} {'size':>9s} {'cells':>6s} {'true':>6s} {'AP@0.5':>7s}")
    for r in images:
        true = "-" if r["true_cells"] is None else str(r["true_cells"])
        ap = "-" if r["ap50"] is None else f"{r['ap50']:.3f}"
        print(f"{r['image']:26s} {r['source']:36s} {r['size']:>9s} {r['cells']:6d} {true:>6s} {ap:>7s}")
    scored = [r["ap50"] for r in images if r["ap50"] is not None]
    print(f"{len(images)} images, {sum(r['cells'] for r in images)} cells, mean AP@0.5 "
          f"{np.mean(scored):.3f}, {seconds:.1f} s (network + masks, all images batched together)")


def run(args: argparse.Namespace) -> int:
    """`cpsam demo`: the segmentation demo, or the model self-check with --self-check."""
    if args.self_check:
        from cpsam import selfcheck  # builds every model: imported when asked for, not for --help

        return selfcheck.run(args)
    if not args.quick:

        if not args.scale > 0:
            print(f"cpsam demo: --scale must be > 0, got {args.scale}", file=sys.stderr)
            return 2
        base = study.StudyScale()
        scale = dataclasses.replace(base, finetune_epochs=max(1, round(base.finetune_epochs * args.scale)),
                                    distill_epochs=max(1, round(base.distill_epochs * args.scale)))
        print("The study at small scale: Cellpose's 2020 'cyto' network (cyto_0, GPL-3.0, from PyPI) segments, is "
              "fine-tuned, and teaches two students; all are scored on held-out images (`--quick`: the one-minute "
              "segmentation demo).")
        study.run_study(args.out, scale)
        return 0
    print("Segmenting sample images with Cellpose's 2020 'cyto' network (cyto_0, GPL-3.0; "
          "downloaded once from PyPI into ~/.cache/cpsam or $CPSAM_CACHE).")
    rows = run_demo(args.out, args.device, args.batch_size)
    print_table(rows)
    print(f"masks and outline overlays written to {args.out}/")
    return 0
