"""The learning-rate finder, with fastai v2's semantics (`Learner.lr_find`, ../shared/research/training_anchors.md
section 6), for any model of the project.

    result = lr_find(net, loss_fn, batches, lambda params: torch.optim.AdamW(params, lr=1e-3))
    result.suggestion, result.plot("lr_find.png")

- Sweep: before step i (0-based) every parameter group gets lr_i = start * (end / start) ** (i / num_it); at most
  num_it steps (fastai's minimum of 6 is kept). The loss of step i is computed before that step's update.
- Recorded loss: fastai's AvgSmoothLoss, val = beta * val + (1 - beta) * loss, reported debiased as
  val / (1 - beta ** count), beta = 0.98.
- Stop: after the step whose smoothed loss exceeds 4x the best smoothed loss so far (that point is recorded),
  also when the loss is not finite (fastai would run on with NaN), or when `batches` runs out (a re-iterable such
  as a list or DataLoader is cycled, like fastai's extra epochs).
- Afterwards the model (parameters and buffers: BatchNorm running statistics and batch counters), its train/eval
  mode, the optimizer's state and torch's RNG state are restored bit for bit.
- Suggestion: fastai's `valley` (the default) on the trimmed range lrs[num_it // 10 : -5] with NaN losses cut:
  the longest decreasing subsequence of losses (O(n^2)), index start + len/3 + len/6 of it; `minimum` (lr at the
  lowest loss / 10) and `steep` (steepest descent in log lr) are given too.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cpsam.io import atomic_path
from train.config import dataset_entries
from train.data import KeySampler, PipelineSpec, make_loader
from train.loop import make_optimizer
from train.model_init import build_model
from train.objective import StepModule, objective_for
from train.sampler import MultiDatasetSampler

BETA = 0.98
DIVERGENCE_FACTOR = 4.0
MIN_ITERATIONS = 6


@dataclass
class LRFinderResult:
    """What a sweep recorded: lrs[i] and the smoothed debiased loss after step i; suggestions on the trimmed range."""

    lrs: list[float]
    losses: list[float]
    num_it: int
    suggestion: float | None
    suggestions: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write loss against lr (log x) with the valley suggestion marked, as a PNG (atomically); returns path."""
        import matplotlib  # plotting libraries (~1 s) only when a plot is drawn

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        lo, hi = trimmed_range(len(self.lrs), self.num_it)
        ax.plot(self.lrs[lo:hi] or self.lrs, self.losses[lo:hi] or self.losses, lw=1.2)
        if self.suggestion is not None:
            k = min(range(len(self.lrs)), key=lambda i: abs(math.log(self.lrs[i]) - math.log(self.suggestion)))
            ax.plot([self.suggestion], [self.losses[k]], "o", color="tab:red", ms=8,
                    label=f"valley: {self.suggestion:.2e}")
            ax.legend()
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title="learning-rate finder")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return Path(path)


def trimmed_range(n_recorded: int, num_it: int) -> tuple[int, int]:
    """fastai's suggestion range [num_it // 10, n - 5) as (start, stop) indices into the recorded points."""
    return min(num_it // 10, n_recorded), max(min(num_it // 10, n_recorded), n_recorded - 5)


def valley(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's `valley`: over the longest decreasing subsequence of `losses` (found in O(n^2); start = its last
    index - its length), the lr at index start + int(span / 3) + int(span / 6), span = last - start: about the
    middle of the run's middle third. None when there is no point."""
    n = len(losses)
    if n == 0:
        return None
    lds = [1] * n
    max_start, max_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def minimum(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's `minimum`: the lr of the lowest loss, divided by 10."""
    return float(lrs[min(range(len(losses)), key=losses.__getitem__)] / 10) if losses else None


def steep(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's `steep`: the lr where the loss falls fastest per log-lr step (argmin of the finite differences)."""
    if len(losses) < 2:
        return None
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return float(lrs[min(range(len(slopes)), key=slopes.__getitem__)])


def _batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate `batches`; start again when a re-iterable runs out (an exhausted one-shot iterator ends it)."""
    while True:
        it = iter(batches)
        empty = True
        for item in it:
            empty = False
            yield item
        if empty or it is batches:
            return


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": {name: m.training for name, m in model.named_modules()},
            "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved["model"][k])
    for name, m in model.named_modules():
        m.training = saved["training"][name]
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def lr_find(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batches: Iterable[tuple[Any, Any]],
            optimizer_factory: Callable[[Any], torch.optim.Optimizer], start_lr: float = 1e-7, end_lr: float = 10.0,
            num_it: int = 100, stop_div: bool = True, progress: bool = False) -> LRFinderResult:
    """Sweep the learning rate exponentially and record the smoothed loss (module docstring for the exact rules).

    model: any nn.Module (trained in train mode during the sweep, then restored). loss_fn(model(input), target) ->
    a 0-d loss tensor (so tuple outputs of the project's models work: e.g. `lambda out, t: cellpose_loss(out[0],
    t)`). batches: an iterable of (input, target) pairs; input is passed to the model as it is (a tensor or a
    dict). optimizer_factory(trainable parameters) -> optimizer (a fresh one, or one already in use: its state
    is restored afterwards). Returns LRFinderResult(lrs, losses, num_it, suggestion = valley, suggestions, ...).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    num_it = max(int(num_it), MIN_ITERATIONS)
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    saved = _snapshot(model, optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    stopped_early, smooth, best = False, 0.0, math.inf
    try:
        model.train()
        stream = _batches_forever(batches)
        for i in tqdm(range(num_it), desc="lr_find", disable=not progress, leave=False):
            try:
                inputs, target = next(stream)
            except StopIteration:
                stopped_early = True
                break
            lr = start_lr * (end_lr / start_lr) ** (i / num_it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(model(inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach().float().mean())
            smooth = BETA * smooth + (1 - BETA) * value  # torch.lerp(loss, val, beta) in fastai
            smoothed = smooth / (1 - BETA ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or (stop_div and smoothed > DIVERGENCE_FACTOR * best):
                stopped_early = True
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
        _restore(model, optimizer, saved)
    lo, hi = trimmed_range(len(lrs), num_it)
    t_lrs, t_losses = lrs[lo:hi], losses[lo:hi]
    finite = next((k for k, v in enumerate(t_losses) if not math.isfinite(v)), len(t_losses))
    t_lrs, t_losses = t_lrs[:finite], t_losses[:finite]
    suggestions = {name: s for name, fn in (("valley", valley), ("minimum", minimum), ("steep", steep))
                   if (s := fn(t_lrs, t_losses)) is not None}
    return LRFinderResult(lrs, losses, num_it, suggestions.get("valley"), suggestions, stopped_early)


def lr_find_for_config(cfg: Any, num_it: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0,
                       progress: bool = True) -> LRFinderResult:
    """`cpsam train lr-find CONFIG.yaml`: the sweep for a run config, any model kind and objective.

    The network is built as `train.loop.train` builds it (`model.*`, `model.init`); batches are the first samples
    of epoch 0 of the run's data through its objective's dataset (augmented as in training) and its
    `prepare_batch`; the loss is the objective's; the optimizer is the run's AdamW (`optim.*`). One process, on
    CUDA when available.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    objective = objective_for(cfg)
    net = build_model(cfg.model)
    paths, weights = dataset_entries(cfg.data.train)
    if not paths:
        raise ValueError("data.train is empty: give at least one canonical dataset folder")
    micro = cfg.micro_batch_size or cfg.batch_size
    sampler = MultiDatasetSampler(paths, weights if weights is not None else cfg.data.weights,
                                  samples_per_epoch=micro * max(int(num_it), MIN_ITERATIONS), seed=cfg.seed,
                                  split=cfg.data.train_split, min_train_masks=cfg.data.min_train_masks)
    spec = PipelineSpec(int(cfg.data.tile_size or net.tile_size), int(cfg.data.channels or net.in_channels),
                        cfg.augment, cfg.degrade)
    dataset = objective.dataset(sampler, spec, cfg.seed, cfg.data.cache_mb)
    step = StepModule(net, objective.aux_modules(net), objective).to(device)
    loader = make_loader(dataset, micro, cfg.data.num_workers, pin_memory=device.type == "cuda",
                         keys=KeySampler(sampler, 0, 0, 1))

    def batches() -> Iterator[tuple[dict[str, Any], None]]:
        for batch in loader:
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with torch.no_grad():
                batch = objective.prepare_batch(batch, device)
            yield batch, None

    return lr_find(step, lambda out, _target: out["loss"], batches(),
                   lambda params: make_optimizer(list(params), cfg.optim, device), start_lr, end_lr, num_it,
                   progress=progress)
