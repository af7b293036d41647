"""train.optim_in_backward: the optimizer step fused into the backward pass gives the normal step's result bit for
bit, frees every gradient, and is refused where it cannot be right."""

from __future__ import annotations

import copy

import pytest
import torch

from train.config import OptimConfig
from train.loop import make_optimizer
from train.optim_in_backward import StepInBackward, blockers, normalize_setting, wanted


class Net(torch.nn.Module):
    """Two layers and a branch used only when asked (a parameter without a gradient in some steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.b = torch.nn.Linear(32, 3)
        self.extra = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = self.norm(torch.relu(self.a(x)))
        return self.b(h) + (self.extra(h) if use_extra else 0)


def _optimizer(net: Net, fused: bool) -> torch.optim.Optimizer:
    if fused:  # the loop's optimizer (fused AdamW), one group
        return make_optimizer(list(net.parameters()), OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    # two groups with different hyperparameters, the default (non-fused) implementation
    decay = [net.a.weight, net.b.weight, net.extra.weight]
    rest = [p for p in net.parameters() if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2)


def _train(net: Net, optimizer: torch.optim.Optimizer, fused_step: bool, steps: int = 6) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    hooks = StepInBackward(optimizer) if fused_step else None
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # a per-step learning rate, set before the backward pass
            group["lr"] = 1e-2 / (1 + step)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 3, generator=gen)
        loss = torch.nn.functional.mse_loss(net(x, use_extra=step % 3 == 1), y)
        loss.backward()
        if hooks is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            assert all(p.grad is None for p in net.parameters())  # every gradient freed as it was used
        losses.append(float(loss.detach()))
    if hooks is not None:
        hooks.remove()
    return losses


@pytest.mark.parametrize("fused", [True, False])
def test_equals_the_normal_step_bit_for_bit(fused: bool) -> None:
    torch.manual_seed(0)
    plain = Net()
    inside = copy.deepcopy(plain)
    opt_plain, opt_inside = _optimizer(plain, fused), _optimizer(inside, fused)
    assert _train(plain, opt_plain, False) == _train(inside, opt_inside, True)
    for (name, p), q in zip(plain.named_parameters(), inside.parameters(), strict=True):
        assert torch.equal(p, q), name
    a, b = opt_plain.state_dict(), opt_inside.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    # the branch used in 2 of 6 steps was stepped twice, the others six times
    steps = {int(s["step"]) for s in a["state"].values()}
    assert steps == {2, 6}


def test_counts_steps_and_detaches() -> None:
    torch.manual_seed(0)
    net = Net()
    optimizer = _optimizer(net, True)
    with StepInBackward(optimizer) as hooks:
        net(torch.randn(4, 16), use_extra=False).sum().backward()
        assert hooks.stepped == 6  # a, norm, b: weight and bias each; extra got no gradient
        assert all(p.grad is None for p in net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(4, 16), use_extra=True).sum().backward()  # detached: gradients accumulate, nothing steps
    assert hooks.stepped == 6
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_blockers_and_settings() -> None:
    assert blockers(world_size=1, accumulation_steps=1, grad_clip=0.0) == []
    found = blockers(world_size=2, accumulation_steps=4, grad_clip=1.0, loss_scaler=True)
    assert len(found) == 4 and "2 processes" in found[0] and "4 gradient accumulation" in found[1]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wanted("auto", cpu, []) and not wanted("auto", cuda, []) and not wanted("auto", cpu, found)
    assert wanted("on", cuda, []) and not wanted("off", cpu, [])
    with pytest.raises(ValueError, match="2 processes"):
        wanted("on", cpu, found)
    with pytest.raises(ValueError, match="must be one of"):
        wanted("sometimes", cpu, [])
    # YAML / OmegaConf read on/off as booleans; a str key then holds "True"/"False"
    assert [normalize_setting(v) for v in ("True", "false", "ON", "auto", True, "x")] == [
        "on", "off", "on", "auto", "on", None]
