"""The paper's evaluation: per-dataset tables with the Cellpose-SAM benchmark's conventions, and the
human-consensus bound.

    cpsam eval paper --model M --data DIR [--data DIR2 ...] --out OUT [--second-annotator DIR]

Conventions (recipe §2, §5; PAPER/benchmarks.py):
- input channels as the paper's benchmark builds them for CP-SAM: a grayscale image goes to the LAST of
  three channels ([0, 0, img]), a two-channel image gets one zero channel prepended ([0, c0, c1]), more
  than three keep the first three; each channel 1-99 % normalized (done by the segmenter). Classic
  (CPnet) models get their own channels (the first `in_channels`) at the size model's diameter when they
  have one (as the paper's cyto3 baseline, which ran the size model first), else the true median diameter.
- `niter` 2000 for bacterial datasets ("bac" in the dataset name), the default otherwise; flow threshold
  0.4, cell-probability threshold 0, tiles of 256 px with 10 % overlap (the segmenter's defaults).
- per image AP = TP / (TP + FP + FN) at IoU 0.5, 0.75, 0.9 and error rate (FP + FN) / (TP + FN) at 0.5,
  then averaged over the images of a dataset (not pooled).
- human-consensus bound (figures.py 255-283): the error rate of a second annotator's masks against the
  first's, averaged over the images that have both, halved.

Under `torchrun` / `accelerate launch` the images are split between the ranks (`cpsam.shard`: disjoint,
balanced by pixel count), each on its own device; rank 0 gathers the rows and writes the outputs, which are
those of one process.

Outputs in OUT: paper_images.csv (per image), paper_table.csv and paper_table.md (dataset rows + mean),
paper_error_rate.png (bars per dataset; the consensus bound as a line when given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpsam import shard
from cpsam.io import atomic_path, read_image
from cpsam.metrics import score_image
from cpsam.size import median_diameter
from data_prep.canonical import CanonicalDataset, to_chw
from eval.invariance import LabelledImage
from eval.report import markdown_table, write_csv

BACTERIAL_NITER = 2000
THRESHOLDS = (0.5, 0.75, 0.9)


def paper_channels(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (3, H, W) float32 placed as the paper's benchmark does: [0, 0, img] for one channel,
    [0, c0, c1] for two, the first three otherwise."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[None]
    out = np.zeros((3, *image.shape[1:]), np.float32)
    c = min(3, image.shape[0])
    out[3 - c:] = image[:c]
    return out


def niter_for(dataset: str) -> int | None:
    """The paper's Euler steps: 2000 for bacterial datasets ("bac" in the name), else the default (None)."""
    return BACTERIAL_NITER if "bac" in dataset.lower() else None


def consensus_error(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> float:
    """Human-consensus bound: half the mean per-image error rate at IoU 0.5 of `second` against `first`."""
    if len(first) != len(second) or not first:
        raise ValueError(f"consensus_error needs the same non-zero number of images, got {len(first)}, {len(second)}")
    rates = [score_image(a, b, thresholds=(0.5,)).at(0.5).error_rate for a, b in zip(first, second, strict=True)]
    return float(np.mean(rates)) / 2.0


def evaluate(model, datasets: Sequence[tuple[str, Sequence]], device=None, progress: bool = True,
             channels: Sequence[int] | None = None, ctx: shard.RankContext | None = None) -> list[dict]:
    """Segment and score every image; `datasets` = [(name, [eval.invariance.LabelledImage-like with raw
    `image` (C, H, W) and `masks`])]. One row per image: dataset, image, ap50, ap75, ap90, err50, niter,
    diameter (px the image was segmented at). `channels`: cellpose-3 channels for classic models (CP-SAM ignores
    them: it gets the paper's placement). `ctx`: a rank of a multi-process run (a started process group): it
    segments its `cpsam.shard.balanced_shares` share of the images; rank 0 returns every row in the
    one-process order, the other ranks an empty list."""
    # torch and the models load when the benchmark runs, not for `cpsam eval paper --help`
    import torch

    from cpsam.models.cellpose_sam import CellposeSAM
    from cpsam.segment import Segmenter

    segmenter = Segmenter(model, device=device or torch.device("cpu"))
    cpsam_model = isinstance(model, CellposeSAM)
    has_size = getattr(model, "size_model", None) is not None
    ctx = ctx or shard.RankContext()
    flat = [(name, item) for name, items in datasets for item in items]
    mine = shard.balanced_shares([np.asarray(item.image).size for _, item in flat], ctx.world_size)[ctx.rank]
    rows: list[tuple[int, dict]] = []
    bar = shard.RankProgress(ctx, len(flat) if progress else 0, desc="paper eval", dynamic_ncols=True)
    for index in mine:
        name, item = flat[index]
        niter = niter_for(name)
        chans = None
        if cpsam_model:
            image, diameter = paper_channels(item.image), None
        else:
            image, chans = np.asarray(item.image, np.float32), channels
            diameter = None if has_size else median_diameter(item.masks)
        result = segmenter.segment([image], diameter=diameter, channel_axis=0, niter=niter, channels=chans)[0]
        s = score_image(item.masks, result.masks, thresholds=THRESHOLDS)
        rows.append((index, {"dataset": name, "image": item.name, "ap50": s.at(0.5).ap, "ap75": s.at(0.75).ap,
                             "ap90": s.at(0.9).ap, "err50": s.at(0.5).error_rate, "niter": result.niter,
                             "diameter": result.diameter}))
        bar.update(1)
    parts = shard.gather_to_main(ctx, rows)
    bar.close()
    return [row for _, row in sorted((r for part in parts for r in part), key=lambda r: r[0])] if parts else []


def table(rows: Sequence[dict]) -> list[dict]:
    """Per-dataset means of the per-image metrics (the paper's rule), then a 'mean' row over datasets."""
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    out = []
    for name in names:
        g = [r for r in rows if r["dataset"] == name]
        out.append({"dataset": name, "images": len(g), **{k: float(np.mean([r[k] for r in g]))
                                                          for k in ("ap50", "ap75", "ap90", "err50")}})
    if len(out) > 1:
        out.append({"dataset": "mean over datasets", "images": len(rows),
                    **{k: float(np.mean([r[k] for r in out])) for k in ("ap50", "ap75", "ap90", "err50")}})
    return out


def _raw_images(folder: Path, max_per_folder: int | None):
    """LabelledImage-like items with the RAW image (C, H, W) (normalization is the segmenter's)."""
    def chw(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a[None] if a.ndim == 2 else a

    items = []
    if (folder / "index.csv").is_file():
        ds = CanonicalDataset(folder, split=None)
        for i in range(len(ds)):
            items.append(LabelledImage(folder.name, ds[i].name, chw(ds.image(i)), ds.mask(i)))
    else:
        for img in sorted(folder.glob("*_img.tif")):
            mask = img.with_name(img.name[: -len("_img.tif")] + "_masks.tif")
            if mask.is_file():
                items.append(LabelledImage(folder.name, img.name[: -len("_img.tif")],
                                           chw(to_chw(read_image(img), path=img)), read_image(mask)))
    return items[:max_per_folder] if max_per_folder else items


def find_datasets(roots: Sequence[Path], max_per_folder: int | None = None) -> list[tuple[str, list]]:
    """[(dataset name, items)] for each root that holds labelled images itself, else for each sub-folder that does."""
    out = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: not a folder")
        own = _raw_images(root, max_per_folder)
        if own:
            out.append((root.name, own))
            continue
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            items = _raw_images(sub, max_per_folder)
            if items:
                out.append((sub.name, items))
    if not out:
        raise FileNotFoundError(f"no labelled images under {', '.join(map(str, roots))}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam eval paper`."""
    parser.add_argument("--model", required=True, help="model file, run folder or pretrained name (as cpsam segment)")
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="test sets: canonical datasets or folders of NAME_img.tif/NAME_masks.tif pairs "
                             "(a folder of such folders gives one row per sub-folder)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--second-annotator", type=Path,
                        help="a folder of a second annotator's NAME_masks.tif for (some of) the images: the "
                             "human-consensus bound is reported for those")
    parser.add_argument("--max-per-folder", type=int, default=None, help="at most this many images per dataset")
    parser.add_argument("--channels", type=int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="classic (CPnet) models: cellpose-3 channels, 1-based (e.g. 2 3 = green cytoplasm, blue "
                             "nuclei; 0 = none); default: the first channels of the image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Evaluate and write the tables; returns the exit code (1 with one line on bad input). Under a launcher
    (WORLD_SIZE > 1) every rank segments its share and rank 0 writes the outputs."""
    ctx = shard.RankContext.from_env()
    with shard.process_group(ctx):
        code = _run(args, ctx)
        shard.barrier(ctx)  # rank 0's files are written before any rank exits (a launcher stops the rest)
    return code


def _run(args: argparse.Namespace, ctx: shard.RankContext) -> int:
    # torch and the models load when the benchmark runs, not for `cpsam eval paper --help`
    import torch

    from cpsam.models import resolve_model

    # one process keeps the CPU as before; each rank of a launched run takes its own device (cuda:LOCAL_RANK)
    device = ctx.device() if ctx.distributed else torch.device("cpu")
    try:
        datasets = find_datasets(list(args.data), args.max_per_folder)
        model = resolve_model(args.model, device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"cpsam eval paper: {exc}", file=sys.stderr)
        return 1
    model.eval()
    rows = evaluate(model, datasets, device=device, progress=not args.quiet, channels=args.channels, ctx=ctx)
    if not ctx.is_main:
        return 0
    summary = table(rows)
    bound = None
    if args.second_annotator is not None:
        firsts, seconds = [], []
        for _, items in datasets:
            for it in items:
                p = args.second_annotator / f"{it.name}_masks.tif"
                if p.is_file():
                    firsts.append(it.masks)
                    seconds.append(read_image(p))
        if not firsts:
            print(f"cpsam eval paper: --second-annotator {args.second_annotator}: no NAME_masks.tif matches an "
                  "image name", file=sys.stderr)
            return 1
        bound = consensus_error(firsts, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "paper_images.csv", rows)
    write_csv(args.out / "paper_table.csv", summary)
    text = markdown_table(summary, ["dataset", "images", "ap50", "ap75", "ap90", "err50"])
    if bound is not None:
        text += f"\n\nHuman-consensus bound (half the second annotator's error rate, {len(firsts)} images): {bound:.4f}"
    with atomic_path(args.out / "paper_table.md") as tmp:
        tmp.write_text(f"# {args.model}: the paper's per-dataset evaluation\n\n{text}\n")
    _plot(summary, bound, args.out / "paper_error_rate.png", str(args.model))
    print(text)
    print(f"wrote {args.out / 'paper_table.md'}, paper_table.csv, paper_images.csv, paper_error_rate.png")
    return 0


def _plot(summary: Sequence[dict], bound: float | None, path: Path, title: str) -> Path:
    import matplotlib  # plotting libraries (~1 s) only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(summary) + 2), 3.6))
    ax.bar(range(len(summary)), [r["err50"] for r in summary], color="tab:blue")
    ax.set_xticks(range(len(summary)), [r["dataset"] for r in summary], rotation=45, ha="right", fontsize=8)
    if bound is not None:
        ax.axhline(bound, color="tab:red", ls="--", label="human consensus")
        ax.legend()
    ax.set(ylabel="error rate @ IoU 0.5", title=title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
