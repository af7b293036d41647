"""The one door from a model spec (a pretrained name, a model file, a run folder) to a flow network.

Every command that takes `--model`, `--teacher` or `--student` goes through `resolve_model`; a spec
that gives no network raises `ModelSpecError`, which each command prints as one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from cpsam.io import not_a_file_problem
from cpsam.models.loading import load_model
from cpsam.models.pretrained import list_pretrained, pretrained
from cpsam.size import SizeModelError, find_size_model


class ModelSpecError(ValueError):
    """A model spec that gives no flow network. `spec` is the spec as given; the message is one line
    naming the spec (or the file it points at) and the problem, ready for `PROG: cannot load ...: {exc}`."""

    def __init__(self, spec: str, message: str) -> None:
        super().__init__(message)
        self.spec = spec


def resolve_model(spec: str, device: torch.device | str = "cpu") -> nn.Module:
    """A flow network from `spec`, on `device`.

    spec: a model file (any format `cpsam.models.loading.load_model` knows), a run folder holding a
    model.pt, or a pretrained name (`cpsam.models.pretrained.list_pretrained`). A classic model's size
    model beside the file (`MODEL_size.npy`, `size_STEM.npy`; see `cpsam.size`) is attached as
    `model.size_model`, so that no diameter means an estimated one; an unreadable size file is
    reported on stderr and ignored.

    Raises ModelSpecError (a ValueError) when the spec is neither a file nor a pretrained name, points at
    something that is not a regular file, holds a cell / background model of the binary family (no
    flows), or cannot be loaded (a bad checkpoint, pretrained weights that cannot be fetched, an error
    while building or moving the network: the message is the loader's own).
    """
    given = spec
    if Path(spec).is_dir() and (Path(spec) / "model.pt").is_file():
        spec = str(Path(spec) / "model.pt")
    if Path(spec).is_file():
        try:
            model = load_model(spec, device=device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelSpecError(given, str(exc)) from exc
        if not hasattr(model, "diam_mean"):  # the binary family predicts cell / background, not flows
            kind = getattr(model, "model_name", type(model).__name__)
            raise ModelSpecError(given, f"--model {spec}: a {kind} cell / background model, not a flow model; "
                                        "segment with `cpsam binary predict`")
        try:
            model.size_model = find_size_model(spec)
        except SizeModelError as exc:
            print(f"cpsam: size model ignored: {exc}", file=sys.stderr)
        return model
    if spec in list_pretrained():
        try:
            return pretrained(spec, device=device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelSpecError(given, str(exc)) from exc
    if Path(spec).exists():
        raise ModelSpecError(given, f"--model {spec}: {not_a_file_problem(spec)}")
    known = ", ".join(list_pretrained())
    raise ModelSpecError(given, f"--model {spec!r} is neither a file nor a pretrained name ({known})")
