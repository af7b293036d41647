"""`cpsam binary`: cell / background U-Nets (see train/binary/workflow.py).

    cpsam binary train   --images DIR [--masks DIR] --out RUN [--model resnet34_unet] [--loading-code CODE]
                         [--encoder-weights FILE] [key=value ...]
    cpsam binary predict --model RUN/model.pt --images DIR --out OUT [--threshold 0.5] [--min-size 0]
    cpsam binary distill --teacher RUN/model.pt --images UNLABELED_DIR --student resnet10t_unet --out RUN2
                         [--temperature 2] [--val DIR] [key=value ...]
    cpsam binary compare RUN1 RUN2|CONFIG.yaml ... --out DIR [--images DIR --masks DIR]
    cpsam binary explore --images DIR [--masks DIR] [--loading-code CODE] [--n 16] --out grid.png [key=value ...]

key=value pairs are training-config overrides (`cpsam train --help` lists the keys) and may stand before or after
the options (every action).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from cpsam import io
from cpsam.cli_types import finite_float, fraction, inference_tile, non_negative_int, preview_count, probability
from cpsam.command import exit_codes
from cpsam.models.loading import CheckpointError
from train.binary import workflow as wf
from train.binary.loading_codes import code_table
from train.binary.workflow import BINARY_MODELS
from train.config import ConfigError
from train.finetune import FinetuneDataError, FinetuneError
from train.loop import TrainingError
from train.run_folder import RunFolderError

IMAGES_HELP = ("images: a folder (labels beside them or in --masks), a FullImage/Mask_Norm/codes.txt root, a "
               "TRAIN_IMG_DIR/0 ... VALID_LABEL_DIR/0 root, or a canonical dataset")


def _code_table() -> str:
    return "loading codes (comma-separated, one entry per network input channel):\n" + "\n".join(
        f"  {entry:9s} {meaning}" for entry, meaning in code_table())


def _add_labelled_images(p: argparse.ArgumentParser) -> None:
    """Options of `train` and `explore`: the labelled images and how their channels load."""
    p.add_argument("--images", required=True, type=Path, help=IMAGES_HELP)
    p.add_argument("--masks", type=Path, default=None, help="folder of label images NAME.* / NAME_masks.*")
    p.add_argument("--loading-code", default="", help="how channels are loaded (default: the first C channels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default 0)")
    p.epilog = _code_table()


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="training config overrides key=value")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam binary train`."""
    _add_labelled_images(p)
    p.add_argument("--out", required=True, type=Path, help="run folder (created; rerun to resume)")
    p.add_argument("--model", default="resnet34_unet", choices=BINARY_MODELS, help="architecture")
    p.add_argument("--encoder-weights", default=None,
                   help="local ImageNet timm/torchvision ResNet file for the encoder (default: random weights)")
    p.add_argument("--init", default=None, help="start from a trained binary model.pt / run folder instead")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="images kept for validation (default 0.2)")
    _add_overrides(p)


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam binary explore`."""
    _add_labelled_images(p)
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--n", type=preview_count, default=16, help="samples in the grid (default 16, at most 1024)")
    _add_overrides(p)


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam binary predict`."""
    p.add_argument("--model", required=True, help="a binary model.pt or run folder")
    p.add_argument("--images", required=True, type=Path, help="folder of images (or a canonical dataset)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--threshold", type=probability, default=0.5, help="cell probability threshold (0.5)")
    p.add_argument("--min-size", type=non_negative_int, default=0, help="drop components under this many px")
    p.add_argument("--tile", type=inference_tile, default=None,
                   help="tile side in px, a multiple of 32 from 32 to 4096 (default 512)")


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam binary distill`."""
    p.add_argument("--teacher", required=True, help="the teacher's model.pt or run folder")
    p.add_argument("--images", required=True, type=Path, help="images without masks (labels beside are ignored)")
    p.add_argument("--student", default="resnet10t_unet", choices=BINARY_MODELS, help="student architecture")
    p.add_argument("--out", required=True, type=Path, help="run folder of the student")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="soft-target temperature T (1)")
    p.add_argument("--val", default=None, help="canonical dataset to validate on (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _add_overrides(p)


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cpsam binary compare`."""
    p.add_argument("runs", nargs="+", help="run folders, model.pt files or YAML configs (trained first)")
    p.add_argument("--out", required=True, type=Path, help="output folder for compare.csv/.md/.png")
    p.add_argument("--images", default=None, help="labelled images to score on (default: the first run's val)")
    p.add_argument("--masks", default=None, help="their labels folder")


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """The error policy of every `cpsam binary` command (each `run_NAME` is decorated with it): 1 for a failed run
    or unreadable input, 2 for a bad request (options, model file, config)."""
    with exit_codes((RunFolderError, 2), ((io.InputFileError, FinetuneDataError), 1),
                    ((FinetuneError, ConfigError, CheckpointError, ValueError), 2),
                    ((TrainingError, io.OutputPathError, OSError), 1)):
        yield


def _run_line(r) -> str:
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if k in ("val_iou", "val_precision", "val_recall"))
    return (f"trained {r.steps} steps in {r.seconds:.0f} s: {r.model_path}, {r.history}, {r.plot}"
            + (f"; validation {metrics}" if metrics else ""))


@_reported()
def run_train(args: argparse.Namespace) -> int:
    """`cpsam binary train`."""
    r = wf.train_binary(args.images, args.out, masks=args.masks, model_name=args.model,
                        loading_code=args.loading_code, init=args.init, encoder_weights=args.encoder_weights,
                        val_fraction=args.val_fraction, seed=args.seed, overrides=args.overrides)
    print(_run_line(r))
    return 0


@_reported()
def run_distill(args: argparse.Namespace) -> int:
    """`cpsam binary distill`."""
    r = wf.distill_binary(args.teacher, args.images, args.student, args.out, temperature=args.temperature,
                          val=args.val, seed=args.seed, overrides=args.overrides)
    print(_run_line(r))
    return 0


@_reported()
def run_predict(args: argparse.Namespace) -> int:
    """`cpsam binary predict`: 0 when every image was segmented, 1 when any failed (each named on stderr)."""
    written, problems = wf.predict_folder(args.model, args.images, args.out, threshold=args.threshold,
                                          min_size=args.min_size, tile=args.tile)
    for problem in problems:
        print(f"cpsam binary predict: {problem}", file=sys.stderr)
    if problems and not written:
        raise io.InputFileError(args.images, "no image could be segmented")
    print(f"wrote masks and probabilities of {len(written) // 2} images to {args.out}"
          + (f"; {len(problems)} failed" if problems else ""))
    return 1 if problems else 0


@_reported()
def run_compare(args: argparse.Namespace) -> int:
    """`cpsam binary compare`."""
    paths = wf.compare_runs(args.runs, args.out, images=args.images, masks=args.masks)
    print(f"wrote {', '.join(str(p) for p in paths)}\n" + paths[1].read_text())
    return 0


@_reported()
def run_explore(args: argparse.Namespace) -> int:
    """`cpsam binary explore`."""
    out = wf.explore(args.images, args.out, masks=args.masks, loading_code=args.loading_code, n=args.n,
                     seed=args.seed, overrides=args.overrides)
    print(f"wrote {out} ({args.n} augmented samples of epoch 0)")
    return 0
