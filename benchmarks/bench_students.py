"""Students against their teachers: end-to-end seconds per image and per stage (read ... write),
peak memory, parameters and FLOPs, for CP-SAM ViT-L, cyto_0 and every student, on the same images.

    python -m benchmarks.bench_students                                  # 3 real 512-px crops, diameter 20
    python -m benchmarks.bench_students --student-checkpoint RUN/model.pt --student-checkpoint RUN2/model.pt
    python -m benchmarks.bench_students --students fastnet-1-32-64,cpnet-1-32 --vit-images 0

Every model runs in its own fresh process (`python -m benchmarks.bench_students --child ...`): it is built or
loaded (not timed), segments every image once as a warm-up (not timed: the first call on each tile
shape builds its oneDNN kernels), then `--rounds` timed passes; the median per image is reported.
One pass times, per image, every stage a user waits for: reading the image file (`cpsam.io.read_image`
of a TIFF the parent wrote), then `Segmenter.segment` split by its `timings` collector into normalize
(channels, percentile normalization), resize (rescaling and padding the input, resizing the flows
back), network (every model call), tiles (cutting, batching, taper blending) and masks (the flow ->
mask dynamics, `cpsam.dynamics.flows_to_masks` with the Segmenter's rules), then writing the masks
(`cpsam.io.write_labels`, TIFF). "bound by" names the stage that takes longest.
Masks of random-weight models (the ViT-L, students without a checkpoint) are not meaningful and their
dynamics cost depends on their noise, so their "masks" time is the teacher's on the same image (the
dynamics cost depends on the image, not on the network that made the flows); trained checkpoints use
their own.

Peak memory: the growth of the child's peak resident set (VmHWM, reset after loading and warm-up,
`benchmarks.bench_model`'s helpers) while it segments its largest image, plus the model's weights; "n per
teacher" = how many such images the student holds in the memory the cyto_0 teacher needs for one
(weights + one image), the seed's GPU-memory claim restated for this machine.
FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one (1, C, tile, tile) forward, times the tiles
the Segmenter cuts from each image. All models use `--diameter` (cyto_0 and the students at the
teacher's diam_mean, the ViT-L at its own 30 px), so every network sees the image at its own scale.
With `--student-checkpoint` the students' masks are scored against the teacher's (binarized IoU,
AP@0.5) and plotted against the speed-up over the teacher; without, the plot shows speed only.
Timings on a shared 2-core machine move with the load (printed before and after): compare ratios
from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.bench_model import peak_rss_bytes, reset_peak_rss, rss_bytes
from benchmarks.bench_segment import SHARED, bench_images
from cpsam.io import write_tiff
from cpsam.segment import Segmenter, tiles_per_image

REPO = Path(__file__).resolve().parents[1]
TEACHER_WEIGHTS = SHARED / "weights" / "cyto_0_cpnet_torch.pt"
VIT_L = "cpsam_vit_l"
# grayscale folders whose images are at least 700 px on each side, so that every crop is --crop wide
DEFAULT_FOLDERS = ("fluo_nuclei_ctc_N2DL-HeLa", "fluo_nuclei_deepcell2016", "phase_usiigaci_3t3")


def default_students() -> list[str]:
    """The one-channel students (the two-channel variants differ only in their first convolution)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.models.students import student_names

    return [name for name in student_names() if name.split("-")[1] == "1"]


# ----------------------------------------------------------------------------- child process


def build_model(spec: str, teacher_diam_mean: float, fuse: bool) -> tuple[nn.Module, bool]:
    """(model in eval mode, trained?) for a weight file / run folder / pretrained name, or a registry name
    (random weights, seed 0; a student's diam_mean is set to the teacher's so it sees the same scale).
    FastNet students are BatchNorm-folded when `fuse` (what the export and a deployment run)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.models import create_model, list_models
    from cpsam.models.students import FastNet

    if Path(spec).exists():
        # imported in the process that runs this measurement only (each side starts fresh)
        from cpsam.models import resolve_model

        model, trained = resolve_model(spec, torch.device("cpu")), True
    elif spec in list_models():
        torch.manual_seed(0)
        model, trained = create_model(spec).eval(), False
        if spec != VIT_L and not spec.startswith("cpsam"):
            model.diam_mean.data.fill_(teacher_diam_mean)
            model.diam_labels.data.fill_(teacher_diam_mean)
    else:
        raise SystemExit(f"bench_students: {spec!r} is neither a file nor a registered model name")
    if fuse and isinstance(model, FastNet):
        model = model.fuse()
    return model.eval(), trained


def flops_per_tile(model: nn.Module) -> int:
    """FLOPs of one (1, in_channels, tile, tile) forward (FlopCounterMode: 2 per multiply-add)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from torch.utils.flop_counter import FlopCounterMode

    tile = int(model.tile_size)
    x = torch.zeros(1, int(model.in_channels), tile, tile)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return int(counter.get_total_flops())


# the stages of one image, in pipeline order ("normalize" .. "masks": `Segmenter`'s timings collector)
STAGES = ("read", "normalize", "resize", "network", "tiles", "masks", "write")


def time_image(seg: Segmenter, path: Path, diameter: float, out: Path) -> tuple[dict[str, float], np.ndarray]:
    """Read, segment and write one image: ({stage: seconds}, masks)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.io import read_image, write_labels

    assert seg.timings is not None
    seg.timings.clear()
    start = time.perf_counter()
    image = read_image(path)
    read_s = time.perf_counter() - start
    masks = seg.segment([image], diameter=diameter)[0].masks
    start = time.perf_counter()
    write_labels(out, masks)
    parts = {"read": read_s, **seg.timings, "write": time.perf_counter() - start}
    return {k: parts.get(k, 0.0) for k in STAGES}, masks


def run_child(spec: str, images_dir: Path, diameter: float, rounds: int, teacher_diam_mean: float,
              fuse: bool, batch_size: int, masks_out: Path) -> dict:
    """Inside a fresh process: build `spec`, warm up, time `rounds` passes, measure memory; save masks."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.io import read_image

    paths = sorted(images_dir.glob("img_*.tif"), key=lambda p: int(p.stem.split("_")[1]))
    images = [read_image(p) for p in paths]
    written = masks_out.with_suffix(".d")
    written.mkdir(exist_ok=True)
    outs = [written / f"masks_{k}.tif" for k in range(len(paths))]
    model, trained = build_model(spec, teacher_diam_mean, fuse)
    seg = Segmenter(model, device="cpu", batch_size=batch_size, timings={})
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    tile_flops = flops_per_tile(model)
    rescale = seg.rescale_for(diameter)
    tiles = [tiles_per_image(image.shape[:2], rescale, seg.rules) for image in images]
    for path, out in zip(paths, outs, strict=True):  # warm-up, not timed
        time_image(seg, path, diameter, out)
    per_round: list[list[dict[str, float]]] = []
    masks: list[np.ndarray] = []
    for _ in range(rounds):
        parts = []
        masks = []
        for path, out in zip(paths, outs, strict=True):
            p, m = time_image(seg, path, diameter, out)
            parts.append(p)
            masks.append(m)
        per_round.append(parts)
    largest = int(np.argmax([image.size for image in images]))
    reset_peak_rss()
    base = rss_bytes()
    time_image(seg, paths[largest], diameter, outs[largest])
    peak = peak_rss_bytes() - base
    np.savez_compressed(masks_out, *masks)
    median = {key: [statistics.median(r[i][key] for r in per_round) for i in range(len(images))] for key in STAGES}
    return {
        "spec": spec, "trained": trained, "class": type(model).__name__, "params": n_params,
        "weight_bytes": weight_bytes, "flops_per_tile": tile_flops, "tiles": tiles, "rescale": rescale,
        "seconds": median, "peak_bytes": peak, "threads": torch.get_num_threads(),
        "rules": seg.rules.mask_rules,
    }


def measure(spec: str, images_dir: Path, args: argparse.Namespace, masks_out: Path, rounds: int) -> dict:
    """`run_child` in a fresh subprocess; returns its JSON result (raises RuntimeError with its stderr)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_students", "--child", spec, "--images-dir", str(images_dir),
           "--diameter", str(args.diameter), "--rounds", str(rounds), "--masks-out", str(masks_out),
           "--teacher-diam-mean", str(args.teacher_diam_mean), "--batch-size", str(args.batch_size)]
    if args.no_fuse:
        cmd.append("--no-fuse")
    if args.threads > 0:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent


def agreement(teacher_masks: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean binarized IoU, mean AP@0.5) of `masks` against the teacher's, per image then averaged."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.metrics import score_image

    scores = [score_image(t, m, thresholds=(0.5,)) for t, m in zip(teacher_masks, masks, strict=True)]
    return float(np.mean([s.binary_iou for s in scores])), float(np.mean([s.at(0.5).ap for s in scores]))


def stage_seconds(result: dict, teacher: dict) -> dict[str, list[float]]:
    """Seconds per stage and image; a random-weight model's masks time is the teacher's (docstring)."""
    sec = dict(result["seconds"])
    if not (result["trained"] or result is teacher):
        sec["masks"] = teacher["seconds"]["masks"][: len(sec["network"])]
    return sec


def total_seconds(result: dict, teacher: dict, n_images: int | None = None) -> list[float]:
    """End-to-end seconds per image (the sum of its stages)."""
    sec = stage_seconds(result, teacher)
    n = len(sec["network"]) if n_images is None else n_images
    return [sum(sec[k][i] for k in STAGES) for i in range(n)]


def vit_speedup(vit: dict | None, result: dict, teacher: dict) -> float:
    """ViT-L seconds / `result` seconds, end to end, on the images the ViT-L ran (NaN without a ViT-L)."""
    if vit is None:
        return float("nan")
    n = len(vit["seconds"]["network"])
    return float(np.mean(total_seconds(vit, teacher, n))) / float(np.mean(total_seconds(result, teacher, n)))


def print_table(results: dict[str, dict], teacher: dict, vit: dict | None,
                scores: dict[str, tuple[float, float]]) -> list[dict]:
    """Print the markdown table (times: mean over the images each model ran) and return its rows."""
    rows = []
    for label, r in results.items():
        n = len(r["seconds"]["network"])
        total = float(np.mean(total_seconds(r, teacher)))
        teacher_total = float(np.mean(total_seconds(teacher, teacher, n)))
        sec = stage_seconds(r, teacher)
        stages = {f"{k}_s": float(np.mean(sec[k][:n])) for k in STAGES}
        row = {
            "model": label, "images": n, "params_M": r["params"] / 1e6,
            "gflops_per_image": r["flops_per_tile"] * float(np.mean(r["tiles"][:n])) / 1e9,
            **stages, "total_s": total, "bound_by": max(STAGES, key=lambda k: stages[f"{k}_s"]),
            "x_cyto0": teacher_total / total,
            "x_vitl": vit_speedup(vit, r, teacher),
            "peak_MiB": (r["peak_bytes"] + r["weight_bytes"]) / 2**20,
        }
        row["n_per_teacher"] = int((teacher["peak_bytes"] + teacher["weight_bytes"]) // max(
            r["peak_bytes"] + r["weight_bytes"], 1))
        row["biou"], row["ap50_vs_teacher"] = scores.get(label, (float("nan"), float("nan")))
        rows.append(row)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return rows


def plot(rows: list[dict], path: Path, with_agreement: bool) -> Path:
    """Agreement with the teacher (binarized IoU) against speed-up over cyto_0, or speed alone."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.report.plots import SpeedPoint, accuracy_speed_scatter

    if with_agreement:
        points = [SpeedPoint(r["model"], r["total_s"], r["biou"]) for r in rows if np.isfinite(r["biou"])]
        return accuracy_speed_scatter(points, path, accuracy_label="binarized IoU vs teacher",
                                      title="students: agreement with cyto_0 vs end-to-end time")
    points = [SpeedPoint(r["model"], r["total_s"], r["x_cyto0"]) for r in rows]
    return accuracy_speed_scatter(points, path, accuracy_label="speed-up over cyto_0 (end to end)",
                                  title="end-to-end seconds per image (random-weight students: speed only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(TEACHER_WEIGHTS), help="the cyto_0 teacher (weight file)")
    parser.add_argument("--students", default="", help="comma-separated registry names (default: every 1-channel)")
    parser.add_argument("--student-checkpoint", action="append", default=[], type=str,
                        help="a trained student (model file or run folder); repeat for several")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--folders", default=",".join(DEFAULT_FOLDERS),
                        help="comma-separated folders of --data to take images from, round-robin (default: three "
                             "grayscale folders with images over 700 px)")
    parser.add_argument("--n-images", type=int, default=3)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--diameter", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vit-images", type=int, default=1, help="images the CP-SAM ViT-L runs on (0: skip it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-diam-mean", type=float, default=27.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-fuse", action="store_true", help="keep FastNet's BatchNorms unfolded")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and numba threads per model (0: torch's default); 1 is less sensitive to "
                             "other processes' load (no thread synchronisation in every layer)")
    parser.add_argument("--plot", type=Path, default=Path("bench_students.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--masks-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.threads > 0:
            # imported in the process that runs this measurement only (each side starts fresh)
            import numba

            torch.set_num_threads(args.threads)
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        print(json.dumps(run_child(args.child, args.images_dir, args.diameter, args.rounds, args.teacher_diam_mean,
                                   not args.no_fuse, args.batch_size, args.masks_out)))
        return 0

    students = [s for s in args.students.split(",") if s] or default_students()
    with tempfile.TemporaryDirectory() as picked:  # bench_images takes every folder of a root: link the chosen
        for name in (f for f in args.folders.split(",") if f):
            if not (args.data / name).is_dir():
                raise SystemExit(f"bench_students: {args.data / name} is not a folder")
            (Path(picked) / name).symlink_to((args.data / name).resolve())
        images = bench_images(Path(picked), args.n_images, args.crop)
    print(f"{len(images)} images ({', '.join(n for n, _ in images)}), crop {args.crop}, diameter {args.diameter}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        images_dir, vit_dir = Path(tmp) / "images", Path(tmp) / "vit_images"  # TIFFs that each child reads
        images_dir.mkdir()
        vit_dir.mkdir()
        for k, (_, image) in enumerate(images):
            write_tiff(images_dir / f"img_{k}.tif", image)
            if k < args.vit_images:
                write_tiff(vit_dir / f"img_{k}.tif", image)
        specs: list[tuple[str, str, int]] = [("cyto_0", args.teacher, args.rounds)]
        specs += [(name, name, args.rounds) for name in students]
        specs += [(f"{Path(p).parent.name}/{Path(p).name}", p, args.rounds) for p in args.student_checkpoint]
        results: dict[str, dict] = {}
        masks: dict[str, list[np.ndarray]] = {}
        for label, spec, rounds in specs:
            out = Path(tmp) / f"masks{len(results)}.npz"
            results[label] = measure(spec, images_dir, args, out, rounds)
            with np.load(out) as data:
                masks[label] = [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]
            r = results[label]
            print(f"  {label:28s} " + "  ".join(f"{k} {np.mean(r['seconds'][k]):.3f} s" for k in STAGES) +
                  f"  ({r['class']}, {r['params'] / 1e6:.2f} M params, load {os.getloadavg()[0]:.1f})", flush=True)
        vit = None
        if args.vit_images > 0:
            out = Path(tmp) / "masks_vit.npz"
            vit = results["CP-SAM ViT-L (random)"] = measure(VIT_L, vit_dir, args, out, 1)
            print(f"  CP-SAM ViT-L: net {np.mean(vit['seconds']['network']):.1f} s per image", flush=True)
    teacher = results["cyto_0"]
    scores = {label: agreement(masks["cyto_0"], masks[label]) for label, r in results.items()
              if r["trained"] and label in masks and label != "cyto_0"}
    rows = print_table(results, teacher, vit, scores)
    print(f"\nload average after the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    plot([r for r in rows if not r["model"].startswith("CP-SAM")], args.plot, bool(scores))
    print(f"plot: {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
