"""The learning-rate finder (fastai v2 semantics): the sweep, the smoothed loss, the divergence stop on a problem
whose divergence point is known, the valley rule, and bit-for-bit restoration of model, optimizer and RNG."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cpsam.models import create_model
from train.lr_find import BETA, lr_find, valley


def _least_squares(curvatures: list[float], n_batches: int = 100, seed: int = 0):
    """f(w) = 1/2 |X w - y|^2 with X^T X = diag(curvatures) and noisy targets: SGD diverges for lr > 2 / max."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(curvatures, dtype=torch.float64)
    x = torch.diag(lam.sqrt())
    w_true = torch.randn(len(curvatures), generator=g, dtype=torch.float64)
    batches = [(x, x @ w_true + 0.1 * torch.randn(len(curvatures), generator=g, dtype=torch.float64))
               for _ in range(n_batches)]
    model = nn.Linear(len(curvatures), 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model, batches


def _sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out[:, 0] - target) ** 2).sum()


@pytest.mark.parametrize("curvature", [4.0, 40.0])
def test_least_squares_stops_past_2_over_L_and_suggests_below(curvature: float) -> None:
    model, batches = _least_squares([curvature, 1.0, 0.5])
    before = model.weight.detach().clone()
    result = lr_find(model, _sse, batches, lambda p: torch.optim.SGD(p, lr=0.1))
    limit = 2.0 / curvature
    assert result.stopped_early and len(result.lrs) < 100
    assert limit < result.lrs[-1] < 8 * limit  # stops soon after plain SGD starts to diverge
    assert all(loss <= 4 * min(result.losses[: k + 1]) for k, loss in enumerate(result.losses[:-1]))
    assert result.losses[-1] > 4 * min(result.losses)
    assert result.suggestion is not None and result.suggestion < limit
    assert result.suggestions["minimum"] < limit
    assert torch.equal(model.weight, before)  # restored bit for bit


def test_sweep_and_smoothing_follow_fastai() -> None:
    """lr_i = start (end / start)^(i / num_it); the loss is the debiased EMA (beta 0.98) of the raw losses."""
    raw = [float(3 + math.sin(i)) for i in range(20)]
    weight = nn.Parameter(torch.zeros(()))
    model = nn.Module()
    model.weight = weight
    model.forward = lambda i: weight * 0 + raw[i]  # type: ignore[method-assign]
    result = lr_find(model, lambda out, _t: out, [(i, None) for i in range(20)], lambda p: torch.optim.SGD(p, lr=1),
                     start_lr=1e-4, end_lr=1.0, num_it=20)
    assert result.lrs == pytest.approx([1e-4 * (1e4) ** (i / 20) for i in range(20)], rel=1e-12)
    for i, got in enumerate(result.losses):
        ema = sum((1 - BETA) * BETA ** (i - k) * raw[k] for k in range(i + 1))
        assert got == pytest.approx(ema / (1 - BETA ** (i + 1)), rel=1e-6)  # the raw losses are float32


def test_re_iterable_batches_are_cycled_and_iterators_end() -> None:
    model, batches = _least_squares([0.1], n_batches=3)
    assert len(lr_find(model, _sse, batches, lambda p: torch.optim.SGD(p), end_lr=1e-3, num_it=12).lrs) == 12
    short = lr_find(model, _sse, iter(batches), lambda p: torch.optim.SGD(p), end_lr=1e-3, num_it=12)
    assert len(short.lrs) == 3 and short.stopped_early


def test_valley_rule() -> None:
    # longest decreasing subsequence of the losses: indices 1..6 (3.5 > 3 > 2.5 > 2 > 1.5 > 1), length 6, so
    # fastai's start = 6 - 6 = 0, span 6, idx = 0 + int(2) + int(1) = 3
    losses = [3.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 1.2, 5.0]
    lrs = [10.0 ** -k for k in range(9, 0, -1)]
    assert valley(lrs, losses) == lrs[3]
    assert valley([], []) is None


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_model_optimizer_batchnorm_rng_restored_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = _BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 2, 8, 8), torch.randn(4, 1, 8, 8)
    for _ in range(3):  # an optimizer in use, with moment estimates, and moved BatchNorm statistics
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.eval()
    model.bn.train()  # a mixed mode must come back as it was
    batches = [(torch.randn(4, 2, 8, 8), torch.randn(4, 1, 8, 8)) for _ in range(5)]
    before, opt_before, rng_before = _state(model), copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    result = lr_find(model, nn.functional.mse_loss, batches, lambda _params: opt, num_it=30)
    assert len(result.lrs) >= 6
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert int(after["bn.num_batches_tracked"]) == 3
    assert not model.training and model.bn.training and not model.conv.training
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters(), strict=True))
    assert opt.state_dict()["state"][0]["step"] == opt_before["state"][0]["step"]
    assert opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("cpsam_tiny", {"tile_size": 64, "layer_drop": 0.2}, (2, 3, 64, 64)),
    ("cpnet", {"nbase": [2, 8, 16]}, (2, 2, 32, 32)),
    ("resnet10t_unet", {"in_chans": 1, "decoder_div": 8}, (2, 1, 64, 64)),
])
def test_every_model_kind(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    """CP-SAM, CPnet and the U-Nets (tuple outputs) sweep and come back unchanged."""
    torch.manual_seed(0)
    net = create_model(name, **kwargs)
    before = _state(net)
    batches = [(torch.randn(*shape), None) for _ in range(2)]
    result = lr_find(net, lambda out, _t: out[0].float().square().mean(), batches,
                     lambda p: torch.optim.AdamW(p, lr=1e-3), num_it=8)
    assert len(result.lrs) >= 2 and all(math.isfinite(v) for v in result.losses[:-1])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
