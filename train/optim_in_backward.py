"""The optimizer step fused into the backward pass: each parameter is updated, and its gradient freed, as soon
as autograd has accumulated that gradient.

Why: with the usual `backward(); optimizer.step()`, every gradient (1.2 GB for CP-SAM ViT-L in float32) is alive at
the end of the backward pass. Stepping each parameter in its post-accumulate-grad hook (the technique of PyTorch's
tutorial "How to save memory by fusing the optimizer step into the backward pass") keeps at most one gradient
alive, so gradients reuse the memory the freed activations leave. On a CPU, where glibc keeps freed heap memory
resident, this is what lets the forward-phase mmap threshold (train.host_memory) bring a ViT-L step's peak RSS to
the activations' own peak (benchmarks/bench_train.py; docs/results/training.md).

Unlike the tutorial's one optimizer per parameter, the run keeps ONE optimizer: the hook runs that optimizer's own
`step()` with every param group narrowed to the one parameter, so its state_dict, checkpoints, exact resume and
the per-step learning rate are exactly those of the normal path. AdamW updates each parameter independently of
the others, so the result is bit for bit the normal path's (tests/train/test_optim_in_backward.py); a parameter that
gets no gradient in a step (a block layer drop skipped for the whole batch) is not stepped, as in the normal path.

It cannot be used where the step needs every gradient at once or the gradient is not final when it is
accumulated: gradient clipping (global norm), gradient accumulation over micro-batches, several processes (DDP
all-reduces gradients after the hook) and a loss scaler; `blockers` names them.
"""

from __future__ import annotations

import torch

SETTINGS = ("auto", "on", "off")
# YAML and OmegaConf's dotlist read on/off/true/false as booleans, which a str key then holds as "True"/"False"
_ALIASES = {"true": "on", "false": "off", "on": "on", "off": "off", "auto": "auto"}


def normalize_setting(value: object) -> str | None:
    """optim.step_in_backward as one of SETTINGS ("auto", "on", "off"; booleans and true/false accepted), or None
    when it is none of them."""
    return _ALIASES.get(str(value).strip().lower())


def blockers(*, world_size: int, accumulation_steps: int, grad_clip: float, loss_scaler: bool = False) -> list[str]:
    """Why the step cannot run inside the backward pass for this run (empty list: it can)."""
    out = []
    if world_size > 1:
        out.append(f"{world_size} processes (gradients are all-reduced after the backward pass)")
    if accumulation_steps > 1:
        out.append(f"{accumulation_steps} gradient accumulation steps")
    if grad_clip > 0:
        out.append("optim.grad_clip (the global gradient norm needs every gradient)")
    if loss_scaler:
        out.append("a loss scaler")
    return out


def wanted(setting: str, device: torch.device, blocked: list[str]) -> bool:
    """Whether to fuse the step into the backward pass. `setting` (config key optim.step_in_backward): "auto" = on
    a CPU device when nothing blocks it (where host memory is the limit; measured there), "on" = wherever nothing
    blocks it (ValueError naming the blockers otherwise), "off" = never."""
    value = normalize_setting(setting)
    if value is None:
        raise ValueError(f"optim.step_in_backward must be one of {', '.join(SETTINGS)}, not {setting!r}")
    setting = value
    if setting == "on" and blocked:
        raise ValueError("optim.step_in_backward=on is not possible with " + "; ".join(blocked)
                         + " (use auto or off)")
    return setting == "on" or (setting == "auto" and device.type == "cpu" and not blocked)


class StepInBackward:
    """Attach to `optimizer`: from now on, every backward pass through its parameters steps them one by one (the
    optimizer's own `step()`, its hyperparameters as they are at that moment) and sets each `.grad` to None.
    Do not call `optimizer.step()` afterwards (it would find no gradients and do nothing). `remove()` (or leaving
    a `with` block on it) detaches.

    `optimizer`: a torch optimizer whose parameters are leaf tensors (the hooks are post-accumulate-grad hooks).
    `stepped`: how many parameter updates have run since attaching.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.stepped = 0
        self._group_of: dict[torch.Tensor, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                self._group_of[param] = index
        self._handles = [param.register_post_accumulate_grad_hook(self._step_one) for param in self._group_of]

    def _step_one(self, param: torch.Tensor) -> None:
        groups = self.optimizer.param_groups
        full = [group["params"] for group in groups]
        owner = self._group_of[param]
        try:
            for index, group in enumerate(groups):
                group["params"] = [param] if index == owner else []
            self.optimizer.step()
        finally:
            for group, params in zip(groups, full, strict=True):
                group["params"] = params
        param.grad = None
        self.stepped += 1

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach the hooks: backward passes accumulate gradients again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
