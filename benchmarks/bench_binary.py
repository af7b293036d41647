"""Real-data proof of the binary family, on CPU: a resnet34_unet trained on binarized masks of ../shared/data,
class weighting measured, and a small student distilled from the teacher's soft targets without masks.

Run:  python -m benchmarks.bench_binary [--work bench_output/binary] [--teacher-minutes 15] [--student-minutes 10]

1. Canonical datasets of six folders of ../shared/data (data_prep.shared_data: the last image of each folder
   is held out for validation): HeLa and DeepCell fluorescence nuclei, U373 and 3T3 phase contrast, CPM-15
   and GBM40 H&E nuclei. Instance masks are binarized by the binary objective (cell = any object).
2. Teacher: resnet34_unet (random init: no ImageNet file is reachable here), 3 input channels (grey images
   zero-padded), crops at native scale (--tile, 128 px), AdamW lr 3e-4 (docs/results/binary.md: why not 1e-3),
   balanced sampling of the folders, through `cpsam binary train`'s config and `train.loop.train`. Its number of
   steps is set so that training fits the time budget: the time of a training step is measured first (three
   forward+backward passes after one warm-up, plus 15 % for data and the optimizer).
3. Class weighting: two continuations of the teacher for the same steps on the same data order, cell weight 1
   and 4; precision and recall of both on the held-out images.
4. Distillation: the training images without their masks (`cpsam binary distill`'s unannotated data) -> a
   resnet10t_unet student (decoder widths halved) trained only on the teacher's soft targets (T = 2).
5. Teacher and student scored on the held-out images (their central 512 x 512 px by default, to bound the time
   on a CPU; foreground IoU per folder, pooled pixel counts) and timed on them (inference only, model loading
   excluded, same process, one after the other).
Writes WORK/report.md and WORK/results.json; the machine's load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDERS = ["fluo_nuclei_ctc_N2DL-HeLa", "fluo_nuclei_deepcell2016", "phase_ctc_U373", "phase_usiigaci_3t3",
           "he_miccai2015_cpm", "he_gbm40_emory"]
CLASS_WEIGHT_FOLDERS = ("u373", "gbm40")  # two held-out images: cheap enough to score twice


def step_seconds(model_name: str, batch: int, tile: int, in_chans: int = 3) -> float:
    """Seconds of one training step (forward + backward of a random batch, mean of 3 after a warm-up) x 1.15."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.models import create_model

    net = create_model(model_name, in_chans=in_chans, num_classes=2).train()
    x = torch.randn(batch, in_chans, tile, tile)
    times = []
    for k in range(4):
        t0 = time.perf_counter()
        net(x)[0].float().logsumexp(1).mean().backward()
        if k:
            times.append(time.perf_counter() - t0)
    return float(np.mean(times)) * 1.15


def schedule_overrides(steps: int, batch: int, lr: float, kind: str = "paper") -> list[str]:
    """Config keys for about `steps` steps of `batch` (never more): 10 or more epochs of whole steps, the first a
    warm-up, the last at lr / 10 ("paper" kind)."""
    per_epoch = max(1, steps // 10)
    return [f"batch_size={batch}", f"schedule.samples_per_epoch={per_epoch * batch}",
            f"schedule.epochs={max(1, steps // per_epoch)}", f"schedule.kind={kind}", "schedule.warmup_epochs=1",
            "schedule.decay1_epochs=1", "schedule.decay2_epochs=0", f"optim.lr={lr}"]


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window of an (H, W) or (C, H, W) array (all of a shorter side; 0 = no crop)."""
    if size <= 0:
        return array
    h, w = array.shape[-2:]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return array[..., y:y + size, x:x + size]


def held_out(roots: list[Path], names: tuple[str, ...] | None = None, crop: int = 0) -> dict[str, list]:
    """Per folder (dataset name) the EvalImage items of its val rows (centre crops of `crop` px when > 0)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from data_prep.canonical import CanonicalDataset
    from train.binary.report import EvalImage

    out = {}
    for root in roots:
        if names is not None and root.name not in names:
            continue
        ds = CanonicalDataset(root, split="val")
        out[root.name] = [EvalImage(r.name, centre_crop(ds.image(i), crop), centre_crop(ds.mask(i), crop))
                          for i, r in enumerate(ds)]
    return out


def score_per_folder(model: Path, images: dict[str, list]) -> dict[str, dict[str, float]]:
    """Per folder and pooled ("all"): IoU, Dice, precision, recall, seconds per image (inference only)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from train.binary.report import score_model

    out, counts, seconds, n = {}, np.zeros(3), 0.0, 0
    for folder, items in images.items():
        s = score_model(model, items)
        out[folder] = {"iou": s.iou, "dice": s.dice, "precision": s.precision, "recall": s.recall,
                       "seconds_per_image": s.seconds_per_image}
        counts += (s.tp, s.fp, s.fn)
        seconds += s.seconds_per_image * s.images
        n += s.images
    tp, fp, fn = counts
    out["all"] = {"iou": tp / max(tp + fp + fn, 1.0), "dice": 2 * tp / max(2 * tp + fp + fn, 1.0),
                  "precision": tp / max(tp + fp, 1.0), "recall": tp / max(tp + fn, 1.0),
                  "seconds_per_image": seconds / max(n, 1), "seconds_total": seconds}
    return out


def link_unlabelled(roots: list[Path], out: Path) -> int:
    """Symlink the training images (not their masks) of the canonical roots into one folder; returns the count."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from data_prep.canonical import CanonicalDataset, image_path

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for root in roots:
        for row in CanonicalDataset(root, split="train"):
            dst = out / f"{root.name}_{row.name}.tif"
            if not dst.exists():
                dst.symlink_to(image_path(root, row.name).resolve())
            n += 1
    return n


def common(tile: int) -> list[str]:
    return [f"data.tile_size={tile}", "data.weights=balanced", "data.num_workers=1", "val.every_epochs=0",
            "checkpoint.every_steps=100", "log.tensorboard=false", "log.progress=false", "log.every_steps=5"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (module docstring); prints the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_output/binary"))
    parser.add_argument("--teacher-minutes", type=float, default=15.0)
    parser.add_argument("--student-minutes", type=float, default=10.0)
    parser.add_argument("--class-weight-steps", type=int, default=30)
    parser.add_argument("--cell-weight", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--teacher-lr", type=float, default=3e-4)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--class-weight-lr", type=float, default=5e-4)
    parser.add_argument("--student", default="resnet10t_unet")
    parser.add_argument("--eval-crop", type=int, default=512, help="score centre crops of this size (0 = whole)")
    parser.add_argument("--folders", nargs="+", default=FOLDERS, help="folders of ../shared/data (default: six)")
    parser.add_argument("--teacher-run", type=Path, default=None,
                        help="reuse this trained teacher run (its model.pt): steps 2-3 are skipped, the student is "
                             "distilled (in WORK/student) and both are scored")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: this benchmark needs the project's shared data", file=sys.stderr)
        return 2
    # imported in the process that runs this measurement only (each side starts fresh)
    from data_prep.shared_data import build_shared_datasets
    from train.binary.data import BinaryData
    from train.binary.workflow import binary_config, distill_binary, make_init
    from train.loop import train

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_start": os.getloadavg(), "cpus": os.cpu_count(), "args": vars(args) | {"work": str(work)}}
    roots = build_shared_datasets(SHARED, work / "data", list(args.folders), flows=False)
    data = BinaryData(roots, roots)
    t_teacher = step_seconds("resnet34_unet", args.batch, args.tile)
    teacher_steps = max(10, int(args.teacher_minutes * 60 / t_teacher))
    results["teacher_step_seconds_estimate"] = t_teacher
    print(f"bench_binary: teacher step ~{t_teacher:.2f} s -> {teacher_steps} steps", file=sys.stderr)

    # 2. teacher
    teacher_run = args.teacher_run.resolve() if args.teacher_run else work / "teacher"
    teacher = teacher_run / "model.pt"
    if args.teacher_run is None:
        init = teacher_run / "init.pt"
        if not init.is_file():
            make_init(init, "resnet34_unet", 3, seed=0)
        cfg = binary_config(teacher_run, data, "resnet34_unet", init, 0,
                            [*common(args.tile), *schedule_overrides(teacher_steps, args.batch, args.teacher_lr)])
        t0 = time.perf_counter()
        results["teacher_steps"] = train(cfg).step
        results["teacher_train_seconds"] = time.perf_counter() - t0
    else:
        # imported in the process that runs this measurement only (each side starts fresh)
        from cpsam.models.loading import read_checkpoint

        if not teacher.is_file():
            print(f"--teacher-run {teacher_run}: no model.pt there", file=sys.stderr)
            return 2
        results["teacher_steps"] = int(read_checkpoint(teacher).get("step") or 0)
        results["teacher_train_seconds"] = float("nan")
        results["teacher_reused"] = str(teacher_run)

    # 3. class weighting: two continuations of the teacher, same steps and data order
    cw_images = held_out(roots, CLASS_WEIGHT_FOLDERS, args.eval_crop)
    results["class_weights"] = {}
    for cell in (1.0, args.cell_weight) if args.teacher_run is None else ():
        run = work / f"class_weight_{cell:g}"
        steps = schedule_overrides(args.class_weight_steps, args.batch, args.class_weight_lr, "constant")
        cfg = binary_config(run, data, "resnet34_unet", teacher, 1,
                            [*common(args.tile), *steps, f"binary.class_weights=[1.0,{cell}]"])
        train(cfg)
        results["class_weights"][f"{cell:g}"] = score_per_folder(run / "model.pt", cw_images)["all"]

    # 4. distillation without masks
    t_student = step_seconds(args.student, args.batch, args.tile) + t_teacher / 3  # + the teacher's forward
    student_steps = max(10, int(args.student_minutes * 60 / t_student))
    unlabelled = work / "unlabelled"
    results["unlabelled_images"] = link_unlabelled(roots, unlabelled)
    t0 = time.perf_counter()
    student = distill_binary(teacher, unlabelled, args.student, work / "student", temperature=args.temperature,
                             overrides=[*common(args.tile), *schedule_overrides(student_steps, args.batch,
                                                                                args.student_lr)], progress=False)
    results["student_steps"] = student.steps
    results["student_train_seconds"] = time.perf_counter() - t0

    # 5. teacher and student on the held-out images
    images = held_out(roots, crop=args.eval_crop)
    results["teacher"] = score_per_folder(teacher, images)
    results["student"] = score_per_folder(work / "student" / "model.pt", images)
    results["load_end"] = os.getloadavg()
    as_json = json.dumps(results, indent=1, default=lambda o: str(o) if isinstance(o, Path) else float(o))
    (work / "results.json").write_text(as_json)
    report = render(results)
    (work / "report.md").write_text(report)
    print(report)
    return 0


def render(r: dict) -> str:
    """The markdown report of a results dict."""
    t, s = r["teacher"], r["student"]
    trained = (f"in {r['teacher_train_seconds'] / 60:.1f} min" if "teacher_reused" not in r
               else f"(reused: {r['teacher_reused']})")
    lines = [f"# bench_binary (CPU, {r['cpus']} cores; load average {r['load_start'][0]:.1f} at start, "
             f"{r['load_end'][0]:.1f} at end)", "",
             f"Teacher resnet34_unet: {r['teacher_steps']} steps of {r['args']['batch']} x {r['args']['tile']} px "
             f"{trained}. Student {r['args']['student']}: {r['student_steps']} "
             f"steps on the soft targets (T = {r['args']['temperature']}) of {r['unlabelled_images']} training "
             f"images without masks, {r['student_train_seconds'] / 60:.1f} min. Scored on the held-out images "
             f"(central {r['args']['eval_crop'] or 'whole'} px).", "",
             "| held-out folder | teacher IoU | student IoU | teacher s/img | student s/img |", "|---|---|---|---|---|"]
    for folder in t:
        lines.append(f"| {folder} | {t[folder]['iou']:.3f} | {s[folder]['iou']:.3f} | "
                     f"{t[folder]['seconds_per_image']:.2f} | {s[folder]['seconds_per_image']:.2f} |")
    speed = t["all"]["seconds_total"] / s["all"]["seconds_total"]
    lines += ["", f"Student - teacher pooled IoU: {s['all']['iou'] - t['all']['iou']:+.3f}; student {speed:.2f}x "
              "faster on the held-out images (inference, model loading excluded)."]
    if r["class_weights"]:
        lines += ["", "| cell weight | precision | recall | IoU |", "|---|---|---|---|"]
    for w, m in r["class_weights"].items():
        lines.append(f"| {w} | {m['precision']:.3f} | {m['recall']:.3f} | {m['iou']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
