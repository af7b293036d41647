"""Proof that fine-tuning improves real segmentation: `cpsam finetune` on the shared images, scored on
images it never saw.

Run:  python -m benchmarks.bench_finetune [--sets he phase] [--work runs/bench_finetune] [key=value ...]

Sets (from ../shared/data, linked into WORK/<set>/train, never copied into the repository):
- he: cyto_0 fine-tuned on the H&E nuclei of he_miccai2015_cpm and he_gbm40_emory, cpm15_image14 kept
  aside; also scored on he_cryonuseg_wip_partial (other H&E nuclei, frozen sections; only part of
  each image is annotated, so its AP is a lower bound for every model alike).
- phase: cyto_0 fine-tuned on phase_ctc_U373 (glioblastoma, phase contrast), frame 02_t049 kept aside;
  also scored on phase_usiigaci_3t3 (another phase-contrast cell line).
Each `cpsam finetune` runs in a fresh process and is timed. Base and fine-tuned models are then scored
on the kept-aside and other images twice: at the diameter each model's size model estimates (what a
user gets with `--diameter 0`) and at the true median diameter of the annotation (the network alone).
Extra key=value arguments go to `cpsam finetune` (e.g. schedule.epochs=50).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

SETS = {
    "he": {
        "train": ["he_miccai2015_cpm", "he_gbm40_emory"], "aside": ["cpm15_image14"],
        "other": ["he_cryonuseg_wip_partial"],
    },
    "phase": {
        "train": ["phase_ctc_U373"], "aside": ["PhC-C2DH-U373_02_t049"], "other": ["phase_usiigaci_3t3"],
    },
}


def link_folder(folders: list[str], leave_out: list[str], out: Path) -> int:
    """Symlink NAME_img.tif / NAME_masks.tif of `folders` into `out`, except `leave_out`; returns the count."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for folder in folders:
        for image in sorted((SHARED / folder).glob("*_img.tif")):
            name = image.name[: -len("_img.tif")]
            if name in leave_out:
                continue
            for src in (image, image.with_name(f"{name}_masks.tif")):
                dst = out / src.name
                if not dst.exists():
                    dst.symlink_to(src)
            n += 1
    return n


def eval_images(folders: list[str], names: list[str] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels) of the named images of `folders` (all when names is None)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import tifffile

    out = []
    for folder in folders:
        for image in sorted((SHARED / folder).glob("*_img.tif")):
            name = image.name[: -len("_img.tif")]
            if names is None or name in names:
                out.append((name, tifffile.imread(image), tifffile.imread(image.with_name(f"{name}_masks.tif"))))
    return out


def score(model, images, channels, true_diameter: bool) -> list[tuple[str, float, float]]:
    """(name, AP@0.5, diameter used) per image."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.metrics import score_image
    from cpsam.segment import Segmenter
    from cpsam.size import median_diameter

    seg = Segmenter(model, device="cpu")
    rows = []
    for name, image, labels in images:
        diameter = median_diameter(labels) if true_diameter else None
        result = seg.segment([image], diameter=diameter, channels=channels)[0]
        rows.append((name, score_image(labels, result.masks).at(0.5).ap, result.diameter))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the sets; print one markdown table per set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=sorted(SETS))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_finetune"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"bench_finetune: {SHARED} is absent; nothing to measure", file=sys.stderr)
        return 2
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.models.loading import load_model
    from cpsam.models.pretrained import pretrained
    from cpsam.size import find_size_model

    for name in args.sets:
        spec = SETS[name]
        work = args.work / name
        n = link_folder(spec["train"], spec["aside"], work / "train")
        cmd = [sys.executable, "-m", "cpsam", "finetune", "--model", "cyto_0", "--images", str(work / "train"),
               "--out", str(work / "run"), "--channels", "0", "0", "log.progress=false", *args.overrides]
        print(f"## {name}: {n} labelled images; {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        seconds = time.perf_counter() - t0
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        base = pretrained("cyto_0")
        tuned = load_model(work / "run" / "model.pt")
        tuned.size_model = find_size_model(work / "run" / "model.pt")
        print(f"finetune wall time {seconds:.0f} s (fresh process, 2 CPU cores)\n")
        print("| images | diameter | cyto_0 AP@0.5 | fine-tuned AP@0.5 |")
        print("|---|---|---|---|")
        for label, images in (("kept aside", eval_images(spec["train"], spec["aside"])),
                              ("other: " + ", ".join(spec["other"]), eval_images(spec["other"], None))):
            for true_diameter in (False, True):
                b = score(base, images, [0, 0], true_diameter)
                a = score(tuned, images, [0, 0], true_diameter)
                how = "true median" if true_diameter else "size model"
                per = "; ".join(f"{nb} {ab:.3f}->{aa:.3f} (d {db:.0f}/{da:.0f})"
                                for (nb, ab, db), (_, aa, da) in zip(b, a, strict=True))
                print(f"| {label} ({len(images)}) | {how} | {np.mean([r[1] for r in b]):.3f} | "
                      f"{np.mean([r[1] for r in a]):.3f} |  <!-- {per} -->", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
