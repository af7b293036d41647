"""`cpsam train`: run a training config, or preview its augmented samples.

    cpsam train CONFIG.yaml [key=value ...]
    cpsam train preview CONFIG.yaml [key=value ...] --n 16 --out grid.png
    cpsam train lr-find CONFIG.yaml [key=value ...] [--num-it 100] --out lr_find.png   (the learning-rate finder)
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
    parser.add_argument("config", help="a YAML run config (scripts/configs/*.yaml), or 'preview' / 'lr-find' then "
                                       "the config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. batch_size=16")
    parser.add_argument("--n", type=int, default=16, help="preview: number of samples in the grid (default 16)")
    parser.add_argument("--out", default=None, help="preview / lr-find: output PNG (default preview.png / "
                                                    "lr_find.png; lr-find also writes the .csv beside it)")
    parser.add_argument("--num-it", type=int, default=100, help="lr-find: number of steps of the sweep (default 100)")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="lr-find: first learning rate (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="lr-find: last learning rate (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (1 with a one-line message on a bad config or a failed run)."""
    overrides = list(args.overrides)
    mode = args.config if args.config in ("preview", "lr-find") else "train"
    if mode != "train":
        if not overrides:
            print(f"cpsam train {mode}: give the config file: cpsam train {mode} CONFIG.yaml [key=value ...]",
                  file=sys.stderr)
            return 2
        path, overrides = overrides[0], overrides[1:]
    else:
        path = args.config
    try:
        cfg = load_config(path, overrides)
        if mode == "preview":
            from train.preview import write_preview

            out = write_preview(cfg, args.n, args.out or "preview.png")
            print(f"wrote {out} ({args.n} augmented samples of epoch 0)")
            return 0
        if mode == "lr-find":
            return _lr_find(cfg, args)
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


def _lr_find(cfg, args: argparse.Namespace) -> int:
    """`cpsam train lr-find`: the sweep (train.lr_find), its plot and CSV, the suggestion on stdout."""
    from pathlib import Path

    from cpsam.io import atomic_path
    from train.lr_find import lr_find_for_config

    if args.num_it < 1 or not 0 < args.start_lr < args.end_lr:
        print("cpsam train lr-find: need --num-it >= 1 and 0 < --start-lr < --end-lr", file=sys.stderr)
        return 2
    result = lr_find_for_config(cfg, args.num_it, args.start_lr, args.end_lr, progress=cfg.log.progress)
    if not result.lrs:
        print("cpsam train lr-find: the training data gave no batch", file=sys.stderr)
        return 1
    png = Path(args.out or "lr_find.png")
    result.plot(png)
    with atomic_path(png.with_suffix(".csv")) as tmp:
        Path(tmp).write_text("lr,smoothed_loss\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in
                                                           zip(result.lrs, result.losses, strict=True)))
    others = ", ".join(f"{k} {v:.2e}" for k, v in result.suggestions.items() if k != "valley")
    best = f"{result.suggestion:.2e}" if result.suggestion is not None else "none (too few points)"
    print(f"lr-find: {len(result.lrs)} steps, {result.lrs[0]:.1e} -> {result.lrs[-1]:.2e}; suggested lr (valley) "
          f"{best}" + (f" ({others})" if others else "") + f"; plot {png}, values {png.with_suffix('.csv')}")
    return 0
