"""Full-state checkpoints of a run folder, written atomically by rank 0.

Run folder layout (the names are an interface):

    config.yaml               the resolved config of the run
    metrics.csv               one row per logged step / validation
    model.pt                  weights only (cpsam checkpoint format: `cpsam segment --model`, `load_model`)
    checkpoints/last/state.pt the whole training state at the latest checkpoint
    checkpoints/best/state.pt the whole training state at the best validation AP@0.5
    checkpoints/best/model.pt weights of the best model

`state.pt` is one torch file holding model weights (float32, CPU), optimizer, step, epoch, the
sampler state (cursor = samples actually consumed, not prefetched), every rank's RNG states, the
best metric and the resolved config. It is written under a temporary name and renamed, so a
failed write (disk full, kill) never damages the previous checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cpsam.io import atomic_path
from cpsam.models.loading import write_torch_file

STATE_FILE = "state.pt"
STATE_FORMAT = "cpsam-train-state"
STATE_VERSION = 1


def last_dir(run: str | os.PathLike[str]) -> Path:
    """checkpoints/last of a run folder."""
    return Path(run) / "checkpoints" / "last"


def best_dir(run: str | os.PathLike[str]) -> Path:
    """checkpoints/best of a run folder."""
    return Path(run) / "checkpoints" / "best"


def save_state(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` (plain objects and CPU tensors) to directory/state.pt atomically; returns the path."""
    path = Path(directory) / STATE_FILE
    payload = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **state}
    return write_torch_file(path, payload)  # a full disk: an OSError naming the file, not torch's RuntimeError


def load_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state saved in directory/state.pt, or None when there is none. Raises ValueError if it is not ours."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - one clear message for a damaged file
        raise ValueError(f"{path}: training state cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a cpsam training state")
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('format_version')} is not {STATE_VERSION}")
    return state


def copy_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a file to `dst` through a temporary name (dst is never half-written)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as float32 CPU tensors (floating) / CPU tensors (others)."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in model.state_dict().items()
    }


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `tensors` (a state_dict) holding a NaN or an Inf, in order."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA when present)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` output."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
