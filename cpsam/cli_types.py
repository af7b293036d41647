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


def positive_int_or_auto(text: str) -> int | str:
    """"auto" (the command picks the number), or an integer >= 1."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


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


# ----------------------------------------------------------------------------- the size guard
# One rule for every size a user gives (an option or a config key): refused up front, the limit named, before any
# work or memory is spent on it.

MAX_PREVIEW_SAMPLES = 1024  # samples in a preview grid (each panel is about 2 x 256 x 256 px of RGB)
TILE_SIZE_LIMITS = (16, 4096)  # px; a 4096-px tile already needs gigabytes of activations
INFERENCE_TILE_STRIDE = 32  # a U-Net/ResNet encoder halves the input five times: tiles are multiples of 32 px


def size_problem(value: int, low: int, high: int, multiple_of: int = 1) -> str | None:
    """The size guard: None when `low <= value <= high` and `value` is a multiple of `multiple_of`, else what is
    wrong, naming the limit (the caller puts the option or key name in front)."""
    step = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
    if not low <= value <= high or value % multiple_of:
        return f"must be between {low} and {high}{step}, got {value}"
    return None


def bounded_int(low: int, high: int, multiple_of: int = 1):
    """An argparse type: an integer that passes `size_problem(value, low, high, multiple_of)`."""

    def parse(text: str) -> int:
        value = _integer(text)
        problem = size_problem(value, low, high, multiple_of)
        return _checked(value, problem is None, problem or "")

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


preview_count = bounded_int(1, MAX_PREVIEW_SAMPLES)
"""Samples in a preview grid: 1 .. MAX_PREVIEW_SAMPLES."""

inference_tile = bounded_int(INFERENCE_TILE_STRIDE, TILE_SIZE_LIMITS[1], INFERENCE_TILE_STRIDE)
"""A tile side for encoder-decoder inference: a multiple of 32 px, 32 .. 4096."""


def png_file(text: str) -> str:
    """An output file name ending in .png (the writer encodes PNG whatever the name says)."""
    return _checked(text, text.lower().endswith(".png"), f"{text!r} must end in .png (a PNG image is written)")
