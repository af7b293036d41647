"""`cpsam distill`: distill a teacher into a fast student (train), build a teacher cache, evaluate, export.

    cpsam distill --teacher cyto_0 --images DIR --student cpnet-1-32-64 --out RUN [key=value ...]
    cpsam distill --teacher RUN_FINETUNED --images UNLABELED_DIR --out STUDENT     (the default student and recipe)
    cpsam distill cache --teacher MODEL [--teacher MODEL ...] --images DIR_OR_DATASET --out CACHE [--views K|auto]
                        [--verify N] [key=value ...]
    cpsam distill --teacher cyto_0 --student cpnet-1-32-64 --out RUN kd.cache=CACHE [key=value ...]
    cpsam distill eval ...      (distill.evaluate)        cpsam distill export ...    (distill.export)
    accelerate launch [--multi_gpu --num_processes N] -m cpsam distill cache ...   (disjoint images per process)

Training (the default action, see distill/workflow.py): DIR may hold images without any masks (the teacher labels
them; every subfolder is a source folder with its own held-out images), or be a canonical dataset / a folder of
canonical datasets (e.g. an earlier RUN/data). key=value pairs are training-config keys (`cpsam train --help`
lists them all: schedule.epochs, schedule.samples_per_epoch, batch_size, optim.lr, kd.alpha, ...).
Exit codes: 0 done, 1 the run failed, 2 bad request (options, files, config), 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpsam import io
from cpsam.cli_types import (
    finite_float,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_int,
    positive_int_or_auto,
)
from cpsam.command import UsageError, exit_codes, interruptible

RESUME_HINT = "rerun the same command to resume"


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by training and `cache`: how the teacher labels raw images."""
    parser.add_argument("--teacher", action="append", default=None, metavar="MODEL",
                        help="teacher model: a pretrained name (cyto_0), an official cpsam or classic Cellpose file, "
                             "one of our model.pt files or run folders; repeat for an ensemble (outputs averaged)")
    parser.add_argument("--diameter", type=non_negative_float, default=0.0,
                        help="cell diameter (px) the teacher segments the images at (0: its size model's estimate, "
                             "else its own diameter)")
    parser.add_argument("--channels", type=non_negative_int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="cellpose-3 channels for the teacher (0 0 = grayscale); default: the first channels")
    parser.add_argument("--val-fraction", type=fraction, default=0.2,
                        help="fraction of each source folder's images held out for validation (default 0.2; at "
                             "least one in every folder of two or more)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the crops and training (default 0)")
    parser.add_argument("--flow-threshold", type=non_negative_float, default=0.4, help="teacher mask rule (0.4)")
    parser.add_argument("--cellprob-threshold", type=finite_float, default=0.0, help="teacher mask rule (0.0)")
    parser.add_argument("--niter", type=non_negative_int, default=None, help="teacher dynamics steps (200 / rescale)")
    parser.add_argument("--teacher-augment", action="store_true",
                        help="flip-averaged teacher: outputs and features averaged over the four flips of each crop "
                             "(as `cpsam segment --augment`), its pseudo-labels segmented with --augment; recorded in "
                             "the cache (kd.teacher_augment for online training)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="training config overrides key=value, e.g. schedule.epochs=20")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam distill` without a sub-command: train a student."""
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of images (masks not needed; subfolders = source folders), a canonical dataset "
                             "or a folder of canonical datasets; optional with kd.cache=CACHE")
    parser.add_argument("--student", default=None,
                        help="student registry name (fastnet-1-32-64-128-256, cpnet-1-32-64, ..., or cpnet with "
                             "model.nbase=[1,32,64]); omitted: the default student fastnet-1-32-64-128-256 with its "
                             "measured recipe (distill.workflow.DEFAULT_RECIPE; key=value pairs override it)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (created; rerun the command to resume)")
    parser.add_argument("--seed-search", type=non_negative_int, default=0, metavar="N",
                        help="train N seeds one epoch each, keep the best by validation KD loss (default 0: off)")
    parser.add_argument("--size-epochs", type=non_negative_int, default=10,
                        help="passes over the training images to fit the student's size model (0: none; default 10)")
    _add_data_arguments(parser)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam distill cache`."""
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of images (labelled by the teacher into CACHE/data), a canonical dataset or a "
                             "folder of canonical datasets")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; rerun to resume)")
    parser.add_argument("--views", type=positive_int_or_auto, default="auto",
                        help="augmented views per image, or auto (default): 32 for pools of up to 38 training images, "
                             "fewer for larger pools (about 1,200 views in all), at least 4 "
                             "(distill.workflow.default_views); resuming, the cache's own count")
    parser.add_argument("--verify", type=non_negative_int, default=0, metavar="N",
                        help="re-run the teacher on N cached views rebuilt from their seeds; print the difference")
    parser.add_argument("--features", default="auto",
                        help="teacher feature maps to store: auto (CPnet decoder / CP-SAM neck), all, none, or names "
                             "separated by commas (decoder, neck, readout)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="views per teacher call (default 8)")
    _add_data_arguments(parser)


def _rules(args: argparse.Namespace) -> dict:
    return {"flow_threshold": args.flow_threshold, "cellprob_threshold": args.cellprob_threshold, "niter": args.niter}


def _load_teacher(specs: list[str] | None, augment: bool = False):
    # imported when this command runs, not for --help (start-up time)
    from distill.teachers import load_teacher

    if not specs:
        raise ValueError("give --teacher MODEL (a pretrained name such as cyto_0, a model file or a run folder), or "
                         "kd.cache=CACHE (its teacher)")
    return load_teacher(specs, augment=augment)


def _cache_teacher(overrides: list[str]) -> list[str] | None:
    """The teacher specs recorded in the manifest of a kd.cache=CACHE override (None without one)."""
    # imported when this command runs, not for --help (start-up time)
    from distill.cache import TeacherCache

    caches = [o.split("=", 1)[1] for o in overrides if o.startswith("kd.cache=")]
    return list(TeacherCache(caches[-1]).teacher["specs"]) if caches and caches[-1] else None


def run_train(args: argparse.Namespace) -> int:
    """`cpsam distill` without a sub-command: distill a student (distill.workflow.distill); 0 done, 1 failed run,
    2 bad request, 128 + N interrupted by signal N (rerun to resume)."""
    # imported when this command runs, not for --help (start-up time)
    from distill.cache import CacheError
    from distill.pseudo_labels import PseudoLabelError
    from distill.teachers import TeacherError
    from distill.workflow import DEFAULT_STUDENT, DistillError, distill, with_default_recipe
    from train.config import ConfigError
    from train.loop import TrainingError

    if not args.out:
        raise UsageError("give --out RUN (or a sub-command: cache, eval, export)")
    student = args.student or DEFAULT_STUDENT
    overrides = list(args.overrides) if args.student else with_default_recipe(args.overrides)
    with interruptible(RESUME_HINT), exit_codes(
            ((DistillError, ConfigError, TeacherError, CacheError, PseudoLabelError, ValueError), 2),
            ((TrainingError, io.InputFileError, OSError), 1)):
        teacher = _load_teacher(args.teacher or _cache_teacher(args.overrides), args.teacher_augment)
        overrides += ["kd.teacher_augment=true"] if args.teacher_augment else []
        result = distill(teacher, args.images, student, args.out, overrides=overrides,
                         val_fraction=args.val_fraction, seed=args.seed, diameter=args.diameter or None,
                         channels=args.channels, rules=_rules(args), seed_search_n=args.seed_search,
                         size_epochs=args.size_epochs, progress=not args.quiet)
    ap = f"best validation AP@0.5 against the teacher's masks {result.best_ap50:.3f}" if result.best_ap50 is not None \
        else "no validation"
    default = "" if args.student else " (the default)"
    print(f"cpsam distill: student {student}{default} (seed {result.seed}) -> {result.model_path}; {ap}; "
          f"{result.seconds:.0f} s" + (f"; size model {result.size_model_path}" if result.size_model_path else ""))
    return 0


def _feature_names(text: str, teacher) -> list[str] | None:
    if text == "auto":
        return None
    if text == "none":
        return []
    if text == "all":
        return list(teacher.feature_shapes(teacher.tile_size))
    return [t.strip() for t in text.split(",") if t.strip()]


def run_cache(args: argparse.Namespace) -> int:
    """`cpsam distill cache`: label raw images if needed, build (or resume) the cache, optionally verify it; exit
    codes as `run_train`."""
    # imported when this command runs, not for --help (start-up time)
    from accelerate import PartialState

    from distill.cache import MANIFEST, CacheError, TeacherCache, build_cache, check_resume, verify_cache
    from distill.pseudo_labels import PseudoLabelError, canonical_roots
    from distill.teachers import TeacherError
    from distill.workflow import DistillError, default_views, distill_config, plan_data
    from train.config import ConfigError
    from train.data import PipelineSpec
    from train.loop import runs_on_cpu

    state = PartialState(cpu=runs_on_cpu())
    with interruptible(RESUME_HINT), exit_codes(
            ((DistillError, ConfigError, TeacherError, CacheError, PseudoLabelError, ValueError), 2),
            ((io.InputFileError, OSError), 1)):
        check_resume(args.out, args.teacher_augment)  # before the teacher labels anything
        teacher = _load_teacher(args.teacher, args.teacher_augment)
        plan = None
        if state.is_main_process:  # the teacher labels raw images once, before any process reads them
            plan = plan_data(teacher, args.images, args.out / "data", val_fraction=args.val_fraction,
                             seed=args.seed, diameter=args.diameter or None, channels=args.channels,
                             rules=_rules(args), progress=not args.quiet)
        state.wait_for_everyone()
        if plan is None:  # the other processes read the labelled datasets the main process wrote
            labelled = args.images if canonical_roots(args.images) is not None else args.out / "data"
            plan = plan_data(teacher, labelled, args.out / "data", progress=False)
        cfg = distill_config(teacher, "cpnet", args.out, plan, seed=args.seed, overrides=args.overrides)
        spec = PipelineSpec(int(cfg.data.tile_size or teacher.tile_size), teacher.in_channels, cfg.augment,
                            cfg.degrade)
        views = args.views
        if views == "auto":  # resuming: the cache's own count (an older default, or another pool size, stays)
            resumed = (args.out / MANIFEST).is_file()
            views = TeacherCache(args.out).views if resumed else default_views(plan.n_train)
            if state.is_main_process:
                why = "the cache's own" if resumed else f"for {plan.n_train} training images"
                print(f"cpsam distill cache: --views auto: {views} views per image ({why})", file=sys.stderr)
        report = build_cache(teacher, [str(p) for p in plan.train_roots], args.out, spec=spec, views=views,
                             seed=args.seed, split=cfg.data.train_split,
                             val_datasets=[str(p) for p in plan.val_roots],
                             features=_feature_names(args.features, teacher), batch_size=args.batch_size,
                             progress=not args.quiet)
        print(f"cpsam distill cache: rank {state.process_index}: {report.written} views written, {report.skipped} "
              f"already there, {report.seconds:.0f} s -> {args.out}")
        if args.verify and state.is_main_process:
            print(f"cpsam distill cache: {verify_cache(TeacherCache(args.out), teacher, args.verify).line()}")
    return 0
