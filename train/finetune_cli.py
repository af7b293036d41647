"""`cpsam finetune`: retrain a model on your own labelled images (see train/finetune.py).

    cpsam finetune --model cyto_0 --images my_images/ --out runs/mine --channels 0 0
    cpsam finetune --model runs/cpsam/model.pt --images crops/ --masks labels/ --out runs/mine schedule.epochs=50
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cpsam import io
from cpsam.cli_types import fraction, non_negative_float, non_negative_int, positive_int
from cpsam.command import exit_codes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam finetune` (extra key=value pairs are training-config overrides, see `cpsam train --help`)."""
    parser.add_argument("--model", required=True,
                        help="the model to start from: a pretrained name (cyto_0), a classic Cellpose file, an "
                             "official cpsam file, one of our model.pt files or run folders")
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of images with labels beside them (NAME_masks.tif, NAME_cp_masks.png, "
                             "NAME_seg.npy) or a canonical dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="run folder (created; rerun to resume)")
    parser.add_argument("--masks", type=Path, default=None, help="folder of label images NAME.* / NAME_masks.*")
    parser.add_argument("--val-fraction", type=fraction, default=0.2,
                        help="fraction of labelled images kept for validation (default 0.2, at least one)")
    parser.add_argument("--diameter", type=non_negative_float, default=0.0,
                        help="cell diameter in pixels for scoring before/after (0: the size model's estimate or the "
                             "model's own)")
    parser.add_argument("--channels", type=non_negative_int, nargs=2, metavar=("SEG", "NUC"), default=None,
                        help="cellpose-3 channels: channel to segment (0 = grayscale) and nuclear channel (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default 0)")
    parser.add_argument("--size-epochs", type=positive_int, default=10,
                        help="passes over the training images when fitting the size model (classic models; default 10)")
    parser.add_argument("overrides", nargs="*", help="training config overrides key=value, e.g. schedule.epochs=50")


def run(args: argparse.Namespace) -> int:
    """Run the workflow; prints the before/after summary. Exit 0 done, 1 failed run, 2 bad request."""
    # imported when this command runs, not for --help (start-up time)
    from train.config import ConfigError
    from train.finetune import FinetuneDataError, FinetuneError, finetune
    from train.loop import TrainingError

    with exit_codes((FinetuneDataError, 1), ((FinetuneError, ConfigError), 2), ((TrainingError, io.InputFileError), 1)):
        result = finetune(
            args.model, args.images, args.out, masks=args.masks, val_fraction=args.val_fraction,
            diameter=args.diameter or None, channels=args.channels, seed=args.seed, overrides=args.overrides,
            size_epochs=args.size_epochs,
        )
    b, a = result.before, result.after
    scores = (f"validation AP@0.5 {b.mean('ap50'):.3f} -> {a.mean('ap50'):.3f}, AP@0.75 {b.mean('ap75'):.3f} -> "
              f"{a.mean('ap75'):.3f}, AP@0.9 {b.mean('ap90'):.3f} -> {a.mean('ap90'):.3f}" if result.val_names else
              "no validation images (--val-fraction 0): not scored")
    print(f"cpsam finetune: {len(result.train_names)} train / {len(result.val_names)} val images, "
          f"{result.seconds:.0f} s; {scores}; "
          f"model {result.model_path}" + (f" (size model {result.size_model_path})" if result.size_model_path else "")
          + f"; report {result.run / 'val_report.md'}")
    return 0
