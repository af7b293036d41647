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

# words, module ("pkg.module" or "pkg.module:NAME", see cpsam.command), one-line help. Later issues add rows here.
COMMANDS: tuple[Command, ...] = (
    Command("segment", "cpsam.segment_cli",
            "segment images or a folder with any model; writes masks, _seg.npy, overlays"),
    Command("finetune", "train.finetune_cli",
            "retrain a model on your own labelled images; scores before/after, results.csv", intermixed=True),
    Command("train", "train.cli",
            "train any model from a YAML config (1 CPU to many GPUs, accelerate); preview crops", intermixed=True),
    Command("train preview", "train.cli:preview",
            "a grid of augmented training samples (epoch 0) of a config", intermixed=True),
    Command("train lr-find", "train.cli:lr_find",
            "the learning-rate finder: loss against learning rate, a suggested lr, plot and CSV", intermixed=True),
    Command("distill", "distill.cli:train",
            "distill a teacher into a fast student: cache teacher outputs, train, eval, export", intermixed=True),
    Command("distill cache", "distill.cli:cache",
            "store the teacher's outputs for K augmented views per image (resumable, sharded)", intermixed=True),
    Command("distill eval", "distill.evaluate",
            "compare students with the teacher (binarized IoU, counts, AP) per image and folder"),
    Command("distill export", "distill.export",
            "a student as one TorchScript file with normalization, tiling and masks inside"),
    Command("eval", "eval.cli",
            "score predicted label images against ground truth (AP, error rate, F1, AJI, IoU)"),
    Command("eval paper", "eval.paper",
            "the paper's per-dataset tables (its channel placement, niter 2000 for bacteria), human bound"),
    Command("eval invariance", "eval.invariance",
            "the paper's invariance benchmark: AP under noise, blur, downsampling, size, channel order"),
    Command("prep", None, "datasets: list, download, convert, flow cache, synthetic cells, crops"),
    Command("prep list", "data_prep.cli:list", "datasets with licence, size and how to obtain them"),
    Command("prep download", "data_prep.cli:download", "download a dataset with a public URL (resumable, verified)"),
    Command("prep convert", "data_prep.cli:convert", "convert a raw dataset folder into the canonical format"),
    Command("prep flows", "data_prep.cli:flows", "fill the flow cache flows/NAME.tif of a canonical dataset"),
    Command("prep synth", "data_prep.cli:synth", "write synthetic cells with masks as a canonical dataset"),
    Command("prep timelapse", "data_prep.cli:timelapse", "random frames x random crops from time-lapse stacks"),
    Command("prep subimages", "data_prep.cli:subimages", "cut a canonical dataset into tiles or per-cell windows"),
    Command("prep info", "data_prep.cli:info",
            "images, objects and diameters per dataset and split of canonical folders"),
    Command("prep export", "data_prep.cli:export",
            "write a canonical dataset as NAME_img.tif / NAME_masks.tif pairs"),
    Command("binary", None, "cell / background U-Nets: train, predict, distill (soft targets), compare"),
    Command("binary train", "train.binary.cli:train",
            "train a U-Net on labelled images (any layout); writes RUN/model.pt, history.csv, history.png",
            intermixed=True),
    Command("binary predict", "train.binary.cli:predict",
            "write NAME_masks.tif (connected components) and NAME_prob.tif (cell probability) per image",
            intermixed=True),
    Command("binary distill", "train.binary.cli:distill",
            "train a student on a teacher's soft targets over images without masks", intermixed=True),
    Command("binary compare", "train.binary.cli:compare",
            "score several runs on the same images: compare.csv / compare.md table and compare.png", intermixed=True),
    Command("binary explore", "train.binary.cli:explore",
            "a grid of augmented training samples with their loading codes applied", intermixed=True),
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
