"""`cpsam train`: run a training config, or preview its augmented samples.

    cpsam train CONFIG.yaml [key=value ...]
    cpsam train preview CONFIG.yaml [key=value ...] --n 16 --out grid.png
    accelerate launch [--multi_gpu --num_processes N ...] -m cpsam train CONFIG.yaml [key=value ...]
    torchrun --nproc_per_node N -m cpsam train CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from train.config import ConfigError, flat_keys, load_config


def _keys_help() -> str:
    lines = ["config keys (set in CONFIG.yaml or as key=value; defaults shown):"]
    for key, value in flat_keys():
        lines.append(f"  {key} = {value!r}")
    return "\n".join(lines)


INTERMIXED_ARGS = True  # key=value overrides may come before and after the options (cpsam.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cpsam train` (the epilog lists every config key with its default)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _keys_help()
    parser.add_argument("config", help="a YAML run config (scripts/configs/*.yaml), or 'preview' then the config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. batch_size=16")
    parser.add_argument("--n", type=int, default=16, help="preview: number of samples in the grid (default 16)")
    parser.add_argument("--out", default="preview.png", help="preview: output PNG (default preview.png)")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (1 with a one-line message on a bad config or a failed run)."""
    overrides = list(args.overrides)
    preview = args.config == "preview"
    if preview:
        if not overrides:
            print("cpsam train preview: give the config file: cpsam train preview CONFIG.yaml --n 16 --out grid.png",
                  file=sys.stderr)
            return 2
        path, overrides = overrides[0], overrides[1:]
    else:
        path = args.config
    try:
        cfg = load_config(path, overrides)
        if preview:
            from train.preview import write_preview

            out = write_preview(cfg, args.n, args.out)
            print(f"wrote {out} ({args.n} augmented samples of epoch 0)")
            return 0
        from train.loop import TrainingError, train

        try:
            result = train(cfg)
        except TrainingError as exc:
            print(f"cpsam train: {exc}", file=sys.stderr)
            return 1
    except (ConfigError, ValueError, OSError) as exc:
        print(f"cpsam train: {exc}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 128 + result.interrupted
    if not result.is_main:
        return 0
    best = f", best val AP@0.5 {result.best_ap50:.3f}" if result.best_ap50 is not None else ""
    print(f"trained {result.step} steps ({result.epoch} epochs) in {result.output_dir}{best}")
    return 0
