"""argparse types shared by every `cpsam` command: each turns one option's text into a checked value or
raises `argparse.ArgumentTypeError`, which argparse reports as a one-line usage error (exit 2) naming the option.

NaN and Inf are never accepted; integers are parsed as integers (`"2.5"` is not an integer).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def finite_float(text: str) -> float:
    """A finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(value, ok: bool, problem: str):
    """`value` when `ok`, else the usage error `problem` (argparse names the option in front of it)."""
    if not ok:
        raise argparse.ArgumentTypeError(problem)
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (NaN, Inf and negative values are usage errors)."""
    value = finite_float(text)
    return _checked(value, value >= 0, f"{text} is negative (give 0 for the default)")


def fraction(text: str) -> float:
    """A float in [0, 1) (a share held out, e.g. --val-fraction)."""
    value = finite_float(text)
    return _checked(value, 0 <= value < 1, f"must be in [0, 1), got {text}")


def probability(text: str) -> float:
    """A float in [0, 1] (e.g. a probability threshold)."""
    value = finite_float(text)
    return _checked(value, 0 <= value <= 1, f"must be in [0, 1], got {text}")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    return _checked(value, value >= 0, f"{text} is negative")


def positive_int(text: str) -> int:
    """An integer >= 1 (0 and negative values are usage errors)."""
    value = _integer(text)
    return _checked(value, value >= 1, f"{text} must be at least 1")


def torch_device(text: str) -> torch.device:
    """A torch device that exists here (cpu, cuda, cuda:1, mps)."""
    import torch  # here, not at the top: commands without a --device option start without loading torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda and mps devices are supported")
    return device
