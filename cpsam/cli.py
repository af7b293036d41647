"""The `cpsam` command: a thin dispatcher to subcommand modules.

Each subcommand lives in its own module (in `cpsam` or in a sibling package) exposing

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int          # the process exit code

Modules are imported only when their subcommand is called, so `cpsam --help` is instant and
`cpsam` itself does not import the packages that depend on it (see DESIGN.md: arrows point down).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module path, one-line help). Later issues add their rows here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "binary": ("train.binary.cli", "cell / background U-Nets: train, predict, distill (soft targets), compare"),
    "demo": ("eval.demo", "the study at small scale: teacher, fine-tuning, two distilled students, evaluation "
                      "(--quick: segment sample images; --self-check: models)"),
    "finetune": ("train.finetune_cli", "retrain a model on your own labelled images; scores before/after, results.csv"),
    "distill": ("distill.cli", "distill a teacher into a fast student: cache teacher outputs, train, eval, export"),
    "eval": ("eval.cli", "score predicted label images against ground truth (AP, error rate, F1, AJI, IoU)"),
    "prep": ("data_prep.cli", "datasets: list, download, convert, flow cache, synthetic cells, crops"),
    "segment": ("cpsam.segment_cli", "segment images or a folder with any model; writes masks, _seg.npy, overlays"),
    "train": ("train.cli", "train any model from a YAML config (1 CPU to many GPUs, accelerate); preview crops"),
}


def _top_level_help() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    rows = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return (
        "usage: cpsam <command> [options]\n\n"
        "Cellpose-SAM reproduction and distillation.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `cpsam <command> --help` for the options of one command."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cpsam` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_top_level_help())
        return 0 if args else 2
    if args[0] in {"-V", "--version"}:
        from cpsam import __version__

        print(f"cpsam {__version__}")
        return 0
    name = args[0]
    if name not in SUBCOMMANDS:
        print(f"cpsam: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module_path, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_path)
        # a module may name sub-commands of its own (`cpsam eval invariance ...`): {word: (module, help)}
        nested = getattr(module, "NESTED_COMMANDS", {})
        if len(args) > 1 and args[1] in nested:
            sub_path, help_ = nested[args[1]]
            name, args = f"{name} {args[1]}", args[1:]
            module = importlib.import_module(sub_path)
        parser = argparse.ArgumentParser(prog=f"cpsam {name}", description=help_)
        module.add_arguments(parser)
        # key=value overrides may stand before and after options (`... a=1 --opt X b=2`) where a module asks
        parse = parser.parse_intermixed_args if getattr(module, "INTERMIXED_ARGS", False) else parser.parse_args
        parsed = parse(args[1:])
        return int(module.run(parsed) or 0)
    except KeyboardInterrupt:  # one line, not a traceback (subcommands that clean up catch it first)
        print(f"cpsam {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
