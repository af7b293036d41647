"""The invariance benchmark of the Cellpose-SAM paper's figure 3, for any model `cpsam segment` opens.

    cpsam eval invariance --model cyto_0 --data ../shared/data --out invariance/ [--max-per-folder 1]

Each labelled image is degraded in six ways at the paper's levels (recipe §5.2: figures.py 523-565,
invariances.ipynb), segmented, and scored (AP and error rate at IoU 0.5, AP at 0.75 and 0.9):

    poisson      photon scale 5, 2.5, 0.5          x <- Poisson(k * x) on the 1-99 % normalized image
    blur         sigma 2, 4, 8 px                  with Poisson noise at photon scale 120
    downsample   factor 2, 5, 10                   blur sigma = factor / 2, every factor-th row and column kept
    anisotropic  factor 2, 6, 12 along Y           sigma_y = factor / 2, sigma_x = 0 (the notebook's choice)
    size         mean cell diameter 10, 15, 30, 60, 90 px   image and masks resized; segmented at diameter 30
    channels     RGB, BRG, GBR, random             the three input channels permuted (random: per image)

Noise, blur and downsampling are `train.degrade` (the training degradations, cellpose's add_noise),
so the benchmark degrades exactly as training does. The level-0 point of every curve is the clean
image. Diameter (except for `size`): `--diameter auto` gives classic (CPnet) models each image's
true median diameter, as the paper's benchmarks give the baselines the size they need, and CP-SAM
none (it segments at its own scale: the point of the model). Outputs in OUT: invariance.csv (one row
per image x condition), invariance_summary.csv, invariance.md and invariance.png (AP@0.5 against level).
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cpsam.io import atomic_path, read_image
from cpsam.metrics import score_image
from cpsam.size import median_diameter
from data_prep.canonical import CanonicalDataset, to_chw
from eval.report import markdown_table, write_csv

CLEAN = "clean"
LEVELS: dict[str, tuple] = {
    "poisson": (5.0, 2.5, 0.5),
    "blur": (2.0, 4.0, 8.0),
    "downsample": (2, 5, 10),
    "anisotropic": (2, 6, 12),
    "size": (10.0, 15.0, 30.0, 60.0, 90.0),
    "channels": ("RGB", "BRG", "GBR", "random"),
}
BLUR_PHOTON_SCALE = 120.0  # the blur series adds mild shot noise (figures.py)
SIZE_SEGMENT_DIAMETER = 30.0  # the size series is segmented at the training diameter, whatever the cells' size
_PERMUTATIONS = {"RGB": (0, 1, 2), "BRG": (2, 0, 1), "GBR": (1, 2, 0)}


@dataclass(frozen=True)
class LabelledImage:
    """One benchmark image: (3, H, W) float32 normalized channels, (H, W) labels, names."""

    dataset: str
    name: str
    image: np.ndarray
    masks: np.ndarray


def _three_channels(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (3, H, W): grayscale in channel 0, missing channels zero, more than 3 cut (cellpose 4)."""
    out = np.zeros((3, *image.shape[1:]), np.float32)
    out[: min(3, image.shape[0])] = image[:3]
    return out


def load_labelled_images(data: str | Path, max_per_folder: int | None = None) -> list[LabelledImage]:
    """Images with masks under `data`: canonical datasets (index.csv) or NAME_img.tif / NAME_masks.tif pairs,
    in the folder itself or its sub-folders (../shared/data). Images come normalized (1-99 % per channel).

    Raises FileNotFoundError when nothing is found.
    """
    from cpsam.transforms import normalize_percentile  # torch: loaded when images are, not for --help

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder")
    out: list[LabelledImage] = []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))]
    for folder in folders:
        items: list[tuple[str, np.ndarray, np.ndarray]] = []
        if (folder / "index.csv").is_file():
            ds = CanonicalDataset(folder, split=None)
            for i in range(len(ds)):
                items.append((ds[i].name, ds.image(i), ds.mask(i)))
                if max_per_folder and len(items) >= max_per_folder:
                    break
        else:
            for img in sorted(folder.glob("*_img.tif")):
                mask = img.with_name(img.name[: -len("_img.tif")] + "_masks.tif")
                if mask.is_file():
                    items.append((img.name[: -len("_img.tif")], to_chw(read_image(img), path=img), read_image(mask)))
                if max_per_folder and len(items) >= max_per_folder:
                    break
        for name, image, masks in items:
            image = np.asarray(image)
            if image.ndim == 2:
                image = image[None]
            chw = np.moveaxis(normalize_percentile(np.moveaxis(np.asarray(image, np.float32), 0, -1)), -1, 0)
            out.append(LabelledImage(folder.name, name, _three_channels(chw), np.asarray(masks).astype(np.int32)))
    if not out:
        raise FileNotFoundError(f"--data {root}: no labelled images (canonical datasets or NAME_img.tif + "
                                "NAME_masks.tif pairs)")
    return out


def mean_diameter(masks: np.ndarray) -> float:
    """Mean equivalent-circle diameter 2 sqrt(area / pi) of the objects in `masks` (px); 0 without objects."""
    areas = np.bincount(masks.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.mean(2.0 * np.sqrt(areas / math.pi))) if areas.size else 0.0


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def degrade(item: LabelledImage, kind: str, level, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (3, H', W') float32 image and (H', W') labels of `item` under one condition of LEVELS (or CLEAN).

    Noise draws are a function of (seed, image, kind, level): the benchmark is reproducible.
    """
    from train.degrade import DegradeParams, degrade_one  # torch: loaded when images are, not for --help

    image, masks = item.image, item.masks
    noise_seed = _seed(seed, item.dataset, item.name, kind, level)
    if kind == CLEAN:
        return image, masks
    if kind == "poisson":
        params = DegradeParams(poisson=True, photon_scale=float(level), noise_seed=noise_seed)
    elif kind == "blur":
        s = float(level)
        params = DegradeParams(blur=True, sigma_y=s, sigma_x=s, poisson=True, photon_scale=BLUR_PHOTON_SCALE,
                               noise_seed=noise_seed)
    elif kind == "downsample":
        ds = int(level)
        params = DegradeParams(downsample=True, ds=ds, blur=True, sigma_y=ds / 2, sigma_x=ds / 2)
    elif kind == "anisotropic":
        ds = int(level)
        params = DegradeParams(downsample=True, ds=ds, iso=False, blur=True, sigma_y=ds / 2, sigma_x=0.0)
    elif kind == "size":
        d = mean_diameter(masks)
        scale = float(level) / d if d > 0 else 1.0
        h, w = masks.shape
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resized = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_LINEAR) for c in image])
        return resized.astype(np.float32), cv2.resize(masks, size, interpolation=cv2.INTER_NEAREST)
    elif kind == "channels":
        if level == "random":
            perm = tuple(np.random.default_rng(noise_seed).permutation(3).tolist())
        else:
            perm = _PERMUTATIONS[level]
        return image[list(perm)], masks
    else:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(LEVELS)}")
    return degrade_one(image, params), masks


def run_benchmark(model, images: Sequence[LabelledImage], kinds: Sequence[str] = tuple(LEVELS),
                  diameter: str = "auto", device=None, seed: int = 0, progress: bool = True,
                  channels: Sequence[int] | None = None) -> list[dict]:
    """Segment every image under every condition of `kinds` (plus clean); one row dict per (image, condition):
    dataset, image, kind, level, ap50, ap75, ap90, err50, n_true, n_pred. `channels`: cellpose-3 channels
    (1-based) of the 3-channel input for classic models (the channel-order series permutes the input first)."""
    # torch and the models load when the benchmark runs, not for `cpsam eval invariance --help`
    import torch

    from cpsam.models.cellpose_sam import CellposeSAM
    from cpsam.segment import Segmenter

    segmenter = Segmenter(model, device=device or torch.device("cpu"))
    classic = not isinstance(model, CellposeSAM)
    jobs = [(CLEAN, 0)] + [(k, lv) for k in kinds for lv in LEVELS[k]]
    rows = []
    bar = tqdm(total=len(jobs) * len(images), desc="invariance", disable=not progress, dynamic_ncols=True)
    for item in images:
        true_d = median_diameter(item.masks)
        for kind, level in jobs:
            image, masks = degrade(item, kind, level, seed)
            if kind == "size":
                d = SIZE_SEGMENT_DIAMETER
            elif diameter == "true" or (diameter == "auto" and classic):
                d = true_d
            elif diameter in ("auto", "model"):
                d = None
            else:
                d = float(diameter)
            result = segmenter.segment([image], diameter=d, channel_axis=0, estimate_diameters=False,
                                       channels=channels if classic else None)[0]
            scores = score_image(masks, result.masks, thresholds=(0.5, 0.75, 0.9))
            rows.append({
                "dataset": item.dataset, "image": item.name, "kind": kind, "level": level,
                "ap50": scores.at(0.5).ap, "ap75": scores.at(0.75).ap, "ap90": scores.at(0.9).ap,
                "err50": scores.at(0.5).error_rate, "n_true": int(len(np.unique(masks)) - 1),
                "n_pred": int(result.masks.max()),
            })
            bar.update(1)
    bar.close()
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean AP@0.5 / AP@0.75 / error rate per (kind, level) over images, in LEVELS order (clean first)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], str(r["level"])), []).append(r)
    order = [(CLEAN, "0")] + [(k, str(lv)) for k, lvs in LEVELS.items() for lv in lvs]
    out = []
    for key in order:
        if key in groups:
            g = groups[key]
            out.append({"kind": key[0], "level": key[1], "images": len(g),
                        "ap50": float(np.mean([r["ap50"] for r in g])), "ap75": float(np.mean([r["ap75"] for r in g])),
                        "err50": float(np.mean([r["err50"] for r in g]))})
    return out


def plot(summary: Sequence[dict], out_png: Path, title: str) -> Path:
    """invariance.png: one panel per degradation, AP@0.5 against level, the clean AP dashed."""
    import matplotlib  # plotting libraries (~1 s) only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next((r["ap50"] for r in summary if r["kind"] == CLEAN), None)
    kinds = [k for k in LEVELS if any(r["kind"] == k for r in summary)]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(3.0 * max(1, len(kinds)), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=False):
        pts = [r for r in summary if r["kind"] == kind]
        labels = [r["level"] for r in pts]
        ax.plot(range(len(pts)), [r["ap50"] for r in pts], marker="o")
        if clean is not None:
            ax.axhline(clean, ls="--", color="gray", lw=1, label="clean")
        ax.set_xticks(range(len(pts)), labels)
        ax.set(title=kind, ylim=(0, 1), xlabel="level")
    axes[0][0].set_ylabel("AP@0.5")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam eval invariance`."""
    parser.add_argument("--model", required=True, help="model file, run folder or pretrained name (as cpsam segment)")
    parser.add_argument("--data", type=Path, required=True,
                        help="labelled images: canonical datasets or NAME_img.tif/NAME_masks.tif pairs "
                             "(sub-folders too)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--kinds", nargs="+", choices=list(LEVELS), default=list(LEVELS), help="degradations to run")
    parser.add_argument("--max-per-folder", type=int, default=None, help="at most this many images per folder")
    parser.add_argument("--diameter", default="auto",
                        help="auto (classic models: true diameter; CP-SAM: none), true, model, or a number in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument("--channels", type=int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="classic (CPnet) models: cellpose-3 channels, 1-based (e.g. 2 3 = green cytoplasm, blue "
                             "nuclei; 0 = none); default: the first channels of the image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and write the outputs; returns the exit code (1 with one line on bad input)."""
    # torch and the models load when the benchmark runs, not for `cpsam eval invariance --help`
    import torch

    from cpsam.models import resolve_model

    if args.diameter not in ("auto", "true", "model"):
        try:
            float(args.diameter)
        except ValueError:
            print(f"cpsam eval invariance: --diameter {args.diameter!r} is not auto, true, model or a number",
                  file=sys.stderr)
            return 2
    try:
        images = load_labelled_images(args.data, args.max_per_folder)
        model = resolve_model(args.model, torch.device("cpu"))
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"cpsam eval invariance: {exc}", file=sys.stderr)
        return 1
    model.eval()
    rows = run_benchmark(model, images, args.kinds, args.diameter, seed=args.seed, progress=not args.quiet,
                         channels=args.channels)
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "invariance.csv", rows)
    write_csv(args.out / "invariance_summary.csv", summary)
    table = markdown_table(summary, ["kind", "level", "images", "ap50", "ap75", "err50"])
    with atomic_path(args.out / "invariance.md") as tmp:
        tmp.write_text(f"# Invariance benchmark: {args.model} on {args.data} ({len(images)} images)\n\n{table}\n")
    plot(summary, args.out / "invariance.png", f"{args.model}: AP@0.5 under degradations ({len(images)} images)")
    print(table)
    print(f"wrote {args.out / 'invariance.md'}, invariance.csv, invariance_summary.csv, invariance.png")
    return 0
