"""The `cpsam` command: the table of every sub-command (the mechanism is in `cpsam.command`).

Each row names the module that implements the command, as a string: the module is imported only when its
command runs, so `cpsam --help` is instant and `cpsam`, the lowest layer, does not import the packages that
depend on it (data_prep, train, distill, eval: the layers' arrows point down). Keep it that way: no imports of
command modules here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cpsam import __version__
from cpsam.command import Command, dispatch

DESCRIPTION = "Cellpose-SAM reproduction and distillation."

def _rows(rows: tuple[tuple[str, str, bool, str], ...]) -> tuple[Command, ...]:
    """Commands from (words, module, intermixed, help) rows."""
    return tuple(Command(words, module, help_, intermixed=intermixed) for words, module, intermixed, help_ in rows)


def _group(group: str, module: str, intermixed: bool, actions: tuple[tuple[str, str], ...]) -> tuple[Command, ...]:
    """The rows of a group whose actions are `run_ACTION` / `add_ACTION_arguments` of one module."""
    return tuple(Command(f"{group} {word}", f"{module}:{word}", help_, intermixed=intermixed)
                 for word, help_ in actions)


# words, module ("pkg.module" or "pkg.module:NAME", see cpsam.command), one-line help. Later issues add rows here.
COMMANDS: tuple[Command, ...] = (
    *_rows((  # words, module, key=value overrides intermixed with the options, help
        ("segment", "cpsam.segment_cli", False,
         "segment images or a folder with any model; writes masks, _seg.npy, overlays"),
        ("finetune", "train.finetune_cli", True,
         "retrain a model on your own labelled images; scores before/after, results.csv"),
        ("train", "train.cli", True,
         "train any model from a YAML config (1 CPU to many GPUs, accelerate); preview crops"),
        ("train preview", "train.cli:preview", True,
         "a grid of augmented training samples (epoch 0) of a config"),
        ("train lr-find", "train.cli:lr_find", True,
         "the learning-rate finder: loss against learning rate, a suggested lr, plot and CSV"),
        ("distill", "distill.cli:train", True,
         "distill a teacher into a fast student: cache teacher outputs, train, eval, export"),
        ("distill cache", "distill.cli:cache", True,
         "store the teacher's outputs for K augmented views per image (resumable, sharded)"),
        ("distill eval", "distill.evaluate", False,
         "compare students with the teacher (binarized IoU, counts, AP) per image and folder"),
        ("distill export", "distill.export", False,
         "a student as one TorchScript file with normalization, tiling and masks inside"),
        ("eval", "eval.cli", False,
         "score predicted label images against ground truth (AP, error rate, F1, AJI, IoU)"),
        ("eval paper", "eval.paper", False,
         "the paper's per-dataset tables (its channel placement, niter 2000 for bacteria), human bound"),
        ("eval invariance", "eval.invariance", False,
         "the paper's invariance benchmark: AP under noise, blur, downsampling, size, channel order"),
    )),
    Command("prep", None, "datasets: list, download, convert, flow cache, synthetic cells, crops"),
    *_group("prep", "data_prep.cli", False, (
        ("list", "datasets with licence, size and how to obtain them"),
        ("download", "download a dataset with a public URL (resumable, verified)"),
        ("convert", "convert a raw dataset folder into the canonical format"),
        ("flows", "fill the flow cache flows/NAME.tif of a canonical dataset"),
        ("synth", "write synthetic cells with masks as a canonical dataset"),
        ("timelapse", "random frames x random crops from time-lapse stacks"),
        ("subimages", "cut a canonical dataset into tiles or per-cell windows"),
        ("info", "images, objects and diameters per dataset and split of canonical folders"),
        ("export", "write a canonical dataset as NAME_img.tif / NAME_masks.tif pairs"),
    )),
    Command("binary", None, "cell / background U-Nets: train, predict, distill (soft targets), compare"),
    *_group("binary", "train.binary.cli", True, (
        ("train", "train a U-Net on labelled images (any layout); writes RUN/model.pt, history.csv, history.png"),
        ("predict", "write NAME_masks.tif (connected components) and NAME_prob.tif (cell probability) per image"),
        ("distill", "train a student on a teacher's soft targets over images without masks"),
        ("compare", "score several runs on the same images: compare.csv / compare.md table and compare.png"),
        ("explore", "a grid of augmented training samples with their loading codes applied"),
    )),
    Command("demo", "eval.demo",
            "the study at small scale (teacher, fine-tuning, two students); --quick: samples; --self-check"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cpsam` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-V"], ["--version"]):
        print(f"cpsam {__version__}")
        return 0
    return dispatch(COMMANDS, args, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
