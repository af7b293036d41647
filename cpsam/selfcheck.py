"""`cpsam demo --self-check`: build every model variant and run one tile through it.

Prints one row per model: parameters, tile, output shape, seconds, and whether the output is
finite. Exits non-zero if any model fails.
"""

from __future__ import annotations

import argparse
import time

import torch

from cpsam.models import create_model

SELF_CHECK_MODELS: tuple[tuple[str, dict], ...] = (
    ("cpsam_tiny", {}),
    ("cpsam_vit_b", {}),
    ("cpsam_vit_l", {}),
    ("cpsam_vit_h", {}),
    ("cpnet", {"nbase": [2, 32, 64, 128, 256]}),
    ("cpnet", {"nbase": [1, 32, 64]}),
    ("cpnet", {"nbase": [1, 32]}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the self-check (also reachable as `cpsam demo --self-check`)."""
    parser.add_argument("--models", help="comma-separated subset of model names (default: all variants)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def self_check(models: list[tuple[str, dict]], device: str) -> list[dict]:
    """Build each (name, kwargs) model with random weights and run one tile; returns one row per model."""
    rows = []
    for name, kwargs in models:
        row: dict = {"model": name + (f" nbase={kwargs['nbase']}" if "nbase" in kwargs else "")}
        try:
            torch.manual_seed(0)
            model = create_model(name, **kwargs).to(device).eval()
            tile = model.tile_size
            x = torch.rand(1, model.in_channels, tile, tile, device=device)
            start = time.perf_counter()
            with torch.inference_mode():
                y = model(x)[0]
            row.update(
                params=sum(p.numel() for p in model.parameters()),
                tile=tile,
                output=tuple(y.shape),
                seconds=time.perf_counter() - start,
                ok=bool(torch.isfinite(y).all()) and tuple(y.shape) == (1, 3, tile, tile),
            )
            del model
        except Exception as exc:  # noqa: BLE001 - the self-check reports every failure and goes on
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':34s} {'params':>12s} {'tile':>5s} {'output':>18s} {'seconds':>8s}  status")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:34s} FAILED: {r['error']}")
            continue
        print(f"{r['model']:34s} {r['params']:12,d} {r['tile']:5d} {str(r['output']):>18s} "
              f"{r['seconds']:8.2f}  {'ok' if r['ok'] else 'BAD OUTPUT'}")


def run(args: argparse.Namespace) -> int:
    """Run the self-check; exit code 1 if any model failed."""
    selected = list(SELF_CHECK_MODELS)
    if args.models:
        names = set(args.models.split(","))
        selected = [m for m in selected if m[0] in names]
    print(f"Self-check on {args.device}: every model variant, one random tile each (random weights).")
    rows = self_check(selected, args.device)
    print_rows(rows)
    failed = [r for r in rows if not r.get("ok")]
    print(f"{len(rows) - len(failed)}/{len(rows)} models ok")
    return 1 if failed else 0
