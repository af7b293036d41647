"""`cpsam train`: run a training config, or preview its augmented samples.

    cpsam train CONFIG.yaml [key=value ...]
    cpsam train preview CONFIG.yaml [key=value ...] --n 16 --out grid.png
    cpsam train lr-find CONFIG.yaml [key=value ...] [--num-it 100] --out lr_find.png   (the learning-rate finder)
    accelerate launch [--multi_gpu --num_processes N ...] -m cpsam train CONFIG.yaml [key=value ...]
    torchrun --nproc_per_node N -m cpsam train CONFIG.yaml [key=value ...]

key=value overrides may stand before and after the options.
"""

from __future__ import annotations

import argparse

from cpsam.cli_types import MAX_PREVIEW_SAMPLES, png_file, preview_count
from cpsam.command import DataError, UsageError, exit_codes
from train.config import ConfigError, flat_keys, load_config


def _keys_help() -> str:
    lines = ["config keys (set in CONFIG.yaml or as key=value; defaults shown):"]
    for key, value in flat_keys():
        lines.append(f"  {key} = {value!r}")
    return "\n".join(lines)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML run config (scripts/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. batch_size=16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cpsam train` (the epilog lists every config key with its default)."""
    parser.epilog = _keys_help()
    _add_config_arguments(parser)


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cpsam train preview`."""
    _add_config_arguments(parser)
    parser.add_argument("--n", type=preview_count, default=16,
                        help=f"number of samples in the grid (default 16, at most {MAX_PREVIEW_SAMPLES})")
    parser.add_argument("--out", type=png_file, default="preview.png", help="output PNG (default preview.png)")


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cpsam train lr-find`."""
    _add_config_arguments(parser)
    parser.add_argument("--out", default="lr_find.png",
                        help="output PNG (default lr_find.png); the values go to the .csv beside it")
    parser.add_argument("--num-it", type=int, default=100, help="number of steps of the sweep (default 100)")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (default 10)")


def _config(args: argparse.Namespace):
    """The run config of CONFIG.yaml with the overrides; a bad key or value (ConfigError, naming it) is one line,
    exit 2 (a usage error, as in every command that takes key=value overrides); an unreadable file exit 1."""
    with exit_codes((ConfigError, 2), ((ValueError, OSError), 1)):
        return load_config(args.config, list(args.overrides))


def run(args: argparse.Namespace) -> int:
    """`cpsam train`: one line, exit 2 on a bad config key or value, exit 1 on a failed run; 128 + N when stopped by
    signal N (the loop has printed where its checkpoint is)."""
    # imported when this command runs, not for --help (start-up time)
    from train.loop import RunStopped, TrainingError, train

    cfg = _config(args)
    try:
        with exit_codes(((ConfigError, TrainingError, ValueError, OSError), 1)):
            result = train(cfg)
    except RunStopped as stopped:
        return 128 + stopped.signum
    if not result.is_main:
        return 0
    best = f", best val AP@0.5 {result.best_ap50:.3f}" if result.best_ap50 is not None else ""
    print(f"trained {result.step} steps ({result.epoch} epochs) in {result.output_dir}{best}")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    """`cpsam train preview`: write the grid of augmented samples."""
    # imported when this command runs, not for --help (start-up time)
    from train.preview import write_preview

    cfg = _config(args)
    with exit_codes(((ConfigError, ValueError, OSError), 1)):
        out = write_preview(cfg, args.n, args.out)
    print(f"wrote {out} ({args.n} augmented samples of epoch 0)")
    return 0


def run_lr_find(args: argparse.Namespace) -> int:
    """`cpsam train lr-find`: the sweep (train.lr_find), its plot and CSV, the suggestion on stdout."""
    # imported when this command runs, not for --help (start-up time)
    from pathlib import Path

    from cpsam.io import atomic_path
    from train.lr_find import lr_find_for_config

    if args.num_it < 1 or not 0 < args.start_lr < args.end_lr:
        raise UsageError("need --num-it >= 1 and 0 < --start-lr < --end-lr")
    cfg = _config(args)
    with exit_codes(((ConfigError, ValueError, OSError), 1)):
        result = lr_find_for_config(cfg, args.num_it, args.start_lr, args.end_lr, progress=cfg.log.progress)
        if not result.lrs:
            raise DataError("the training data gave no batch")
        png = Path(args.out)
        result.plot(png)
        with atomic_path(png.with_suffix(".csv")) as tmp:
            Path(tmp).write_text("lr,smoothed_loss\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in
                                                               zip(result.lrs, result.losses, strict=True)))
    others = ", ".join(f"{k} {v:.2e}" for k, v in result.suggestions.items() if k != "valley")
    best = f"{result.suggestion:.2e}" if result.suggestion is not None else "none (too few points)"
    print(f"lr-find: {len(result.lrs)} steps, {result.lrs[0]:.1e} -> {result.lrs[-1]:.2e}; suggested lr (valley) "
          f"{best}" + (f" ({others})" if others else "") + f"; plot {png}, values {png.with_suffix('.csv')}")
    return 0
