"""Learning-rate schedules, as per-step values or multipliers (for LambdaLR or for setting param_group["lr"]).

Three kinds (`ScheduleConfig.kind`):

- "paper": Cellpose-SAM pre-training (AdamW lr 5e-5, wd 0.1, 2000 epochs): linear warm-up from 0 over
  `warmup_epochs`, resolved per step; then constant; lr/10 for the last `decay1_epochs`, lr/100 for the last
  `decay2_epochs` (see `paper_epoch_lr_factor` for runs too short for these windows).
- "cellpose": `cellpose.train.train_seg`'s per-epoch list (`cellpose_epoch_lrs`), constant within an epoch.
- "constant": base_lr at every step.

Step k is the k-th optimizer step of the run, counted from 0; its fractional epoch is k / steps_per_epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULE_KINDS = ("paper", "cellpose", "constant")
CELLPOSE_WARMUP_EPOCHS = 10  # train_seg: LR[:10] = linspace(0, lr, 10)
CELLPOSE_HALVINGS = 10  # train_seg: the final decay halves the LR 10 times (down to lr / 1024)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule of a run (OmegaConf structured-config friendly).

    kind: "paper", "cellpose" or "constant".
    epochs: run length in epochs.
    samples_per_epoch: training samples per epoch (with the global batch size it gives `steps_per_epoch`).
    warmup_epochs: "paper" linear warm-up length (epochs), from lr 0 at step 0.
    decay1_epochs: "paper": the last this-many epochs run at lr / 10.
    decay2_epochs: "paper": the last this-many epochs run at lr / 100 (must not exceed decay1_epochs).
    """

    kind: str = "paper"
    epochs: int = 100
    samples_per_epoch: int = 800
    warmup_epochs: int = 10
    decay1_epochs: int = 100
    decay2_epochs: int = 50


def _check_config(cfg: ScheduleConfig) -> None:
    """ValueError naming the first bad field of `cfg`."""
    if cfg.kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {cfg.kind!r}")
    if cfg.epochs < 1:
        raise ValueError(f"schedule epochs must be >= 1, got {cfg.epochs}")
    if cfg.samples_per_epoch < 1:
        raise ValueError(f"schedule samples_per_epoch must be >= 1, got {cfg.samples_per_epoch}")
    _check_paper_windows(cfg.warmup_epochs, cfg.decay1_epochs, cfg.decay2_epochs)


def _check_paper_windows(warmup_epochs: float, decay1_epochs: float, decay2_epochs: float) -> None:
    if warmup_epochs < 0 or decay1_epochs < 0 or decay2_epochs < 0:
        raise ValueError(
            f"warmup/decay epochs must be >= 0, got {warmup_epochs}, {decay1_epochs}, {decay2_epochs}"
        )
    if decay2_epochs > decay1_epochs:
        raise ValueError(f"decay2_epochs ({decay2_epochs}) must not exceed decay1_epochs ({decay1_epochs})")


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")


def cellpose_epoch_lrs(lr: float, n_epochs: int) -> np.ndarray:
    """`cellpose.train.train_seg`'s learning rate of every epoch, float64 (n_epochs,).

    Epochs 0..9 ramp as linspace(0, lr, 10) (epoch 0 runs at lr 0), then lr. If n_epochs > 300 the last 100
    epochs are 10 blocks of 10 epochs at lr/2, lr/4, ..., lr/1024; elif n_epochs >= 100 the last 50 epochs are
    10 blocks of 5 epochs with the same halvings. Shorter runs (< 10 epochs) stop inside the ramp.
    Raises ValueError for n_epochs < 1 or a negative lr.
    """
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    lrs = np.full(max(n_epochs, CELLPOSE_WARMUP_EPOCHS), float(lr))
    lrs[:CELLPOSE_WARMUP_EPOCHS] = np.linspace(0.0, lr, CELLPOSE_WARMUP_EPOCHS)
    lrs = lrs[:n_epochs]
    if n_epochs > 300:
        block = 10
    elif n_epochs >= 100:
        block = 5
    else:
        return lrs
    decay_epochs = block * CELLPOSE_HALVINGS
    halvings = 1 + np.arange(decay_epochs) // block
    lrs[-decay_epochs:] = lr / 2.0**halvings
    return lrs


def _fitted_decay_windows(
    n_epochs: int, warmup_epochs: float, decay1_epochs: float, decay2_epochs: float
) -> tuple[float, float]:
    """The decay windows actually used: unchanged when decay1 fits in half the post-warm-up span, else both
    scaled by the same factor so that decay1 = half of it (fractional epochs allowed)."""
    after_warmup = max(n_epochs - warmup_epochs, 0.0)
    if decay1_epochs <= after_warmup / 2 or decay1_epochs == 0:
        return float(decay1_epochs), float(decay2_epochs)
    scale = (after_warmup / 2) / decay1_epochs
    return decay1_epochs * scale, decay2_epochs * scale


def paper_epoch_lr_factor(
    epoch: float, n_epochs: int, warmup_epochs: float = 10, decay1_epochs: float = 100, decay2_epochs: float = 50
) -> float:
    """The Cellpose-SAM paper's LR multiplier at a (fractional) epoch.

    epoch: position in the run in epochs, >= 0 (step / steps_per_epoch for the step about to be taken).
    Warm-up: factor = epoch / warmup_epochs for epoch < warmup_epochs, i.e. 0 at step 0, rising linearly per
    step, and 1 from the first step of epoch `warmup_epochs` on (warmup_epochs = 0: no warm-up).
    Then 1, except 0.1 for epoch >= n_epochs - decay1 and 0.01 for epoch >= n_epochs - decay2 (the last decay1
    and decay2 epochs). The paper run (2000 epochs) uses the windows as given.
    Short runs: if decay1 is longer than half of the post-warm-up span (n_epochs - warmup_epochs), both decay
    windows are shrunk by the same factor so that decay1 is exactly that half (e.g. 100 epochs with the
    defaults: full lr on epochs 10..55, /10 on 55..77.5, /100 on 77.5..100), so at least half the post-warm-up
    run is at full lr. If n_epochs <= warmup_epochs the run ends inside the warm-up with no decay.
    Epochs past n_epochs keep the final factor. Returns a float in [0, 1].
    Raises ValueError for a negative epoch, n_epochs < 1, negative windows or decay2 > decay1.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    _check_paper_windows(warmup_epochs, decay1_epochs, decay2_epochs)
    if epoch < warmup_epochs:
        return float(epoch) / float(warmup_epochs)
    decay1, decay2 = _fitted_decay_windows(n_epochs, warmup_epochs, decay1_epochs, decay2_epochs)
    if decay2 > 0 and epoch >= n_epochs - decay2:
        return 0.01
    if decay1 > 0 and epoch >= n_epochs - decay1:
        return 0.1
    return 1.0


def total_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in the whole run: cfg.epochs * steps_per_epoch."""
    _check_config(cfg)
    _check_steps_per_epoch(steps_per_epoch)
    return cfg.epochs * steps_per_epoch


def steps_per_epoch_for(cfg: ScheduleConfig, global_batch_size: int) -> int:
    """Optimizer steps per epoch: ceil(cfg.samples_per_epoch / global_batch_size) (the last batch may be short,
    as in train_seg's `range(0, nimg_per_epoch, batch_size)`). Raises ValueError for a batch size < 1."""
    _check_config(cfg)
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return math.ceil(cfg.samples_per_epoch / global_batch_size)


def lr_at_step(cfg: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int) -> float:
    """Learning rate (same unit as base_lr) for optimizer step `step` (0-based) of the run described by `cfg`.

    "paper": base_lr * paper_epoch_lr_factor(step / steps_per_epoch, ...), linear per step in the warm-up.
    "cellpose": cellpose_epoch_lrs(base_lr, cfg.epochs)[step // steps_per_epoch], constant within an epoch.
    "constant": base_lr. Steps past the run keep the last epoch's value.
    Raises ValueError for a bad config, a negative step or base_lr, or steps_per_epoch < 1.
    """
    _check_config(cfg)
    _check_steps_per_epoch(steps_per_epoch)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    if cfg.kind == "constant":
        return float(base_lr)
    if cfg.kind == "cellpose":
        epoch = min(step // steps_per_epoch, cfg.epochs - 1)
        return float(cellpose_epoch_lrs(base_lr, cfg.epochs)[epoch])
    factor = paper_epoch_lr_factor(
        step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.decay1_epochs, cfg.decay2_epochs
    )
    return float(base_lr) * factor


class _ResumableLambdaLR(LambdaLR):
    """LambdaLR whose load_state_dict also puts the restored step's LR back into the optimizer, so a resumed run
    is exact whether the optimizer state was loaded before or after the scheduler was built."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int
) -> LambdaLR:
    """A LambdaLR giving `lr_at_step(cfg, base_lr, step, steps_per_epoch)` at step `step`.

    Call `scheduler.step()` once after every `optimizer.step()`; right after construction the optimizer holds
    step 0's LR. Each param group's LR is its own initial LR times lr_at_step / base_lr, so a group created at
    base_lr follows lr_at_step (to float rounding) and groups at other LRs scale with it.
    The multiplier is a plain function, so `state_dict()` holds only numbers (loads with weights_only=True);
    `load_state_dict` restores the step and the optimizer's current LR exactly.
    Raises ValueError for a bad config, base_lr <= 0, steps_per_epoch < 1, or when the first param group's
    initial LR differs from base_lr.
    """
    _check_config(cfg)
    _check_steps_per_epoch(steps_per_epoch)
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    first = optimizer.param_groups[0]
    group_lr = float(first.get("initial_lr", first["lr"]))
    if not math.isclose(group_lr, base_lr, rel_tol=1e-12):
        raise ValueError(f"the optimizer's lr {group_lr} does not match base_lr {base_lr}")

    def lr_multiplier(step: int) -> float:
        return lr_at_step(cfg, base_lr, step, steps_per_epoch) / base_lr

    return _ResumableLambdaLR(optimizer, lr_multiplier)
