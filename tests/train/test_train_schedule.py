"""train.schedule: cellpose train_seg's LR list (captured from train_seg itself), paper schedule, LambdaLR resume."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from cellpose import train as cellpose_train
from omegaconf import OmegaConf
from torch import nn

from train.schedule import (
    ScheduleConfig,
    cellpose_epoch_lrs,
    lr_at_step,
    make_scheduler,
    paper_epoch_lr_factor,
    steps_per_epoch_for,
    total_steps,
)


class _TinyNet(nn.Module):
    """The least train_seg needs of a network: a 1x1 conv plus the attributes train_seg reads."""

    backbone = "tiny"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.diam_labels = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.conv(x), None

    def save_model(self, filename) -> None:  # train_seg saves checkpoints; nothing to keep here
        pass


def _train_seg_lrs(n_epochs: int, lr: float, tmp_path, monkeypatch) -> np.ndarray:
    """Run cellpose's own `train_seg` (one image, one step per epoch) and record the LR of every optimizer step.

    train_seg builds its LR list inline (no cellpose function returns it), so the reference is captured from the
    real code path: AdamW is swapped for a subclass that logs param_groups[0]["lr"] at each step.
    """
    seen: list[float] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(float(self.param_groups[0]["lr"]))
            return super().step(closure)

    monkeypatch.setattr(cellpose_train.torch.optim, "AdamW", RecordingAdamW)
    masks = np.zeros((24, 24), np.uint16)
    masks[2:8, 2:8], masks[10:18, 4:12], masks[14:22, 14:22] = 1, 2, 3
    image = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    (tmp_path / "models").mkdir(exist_ok=True)
    numpy_state = np.random.get_state()  # train_seg reseeds numpy's global RNG every epoch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cellpose_train.train_seg(
                _TinyNet(), train_data=[image], train_labels=[masks], n_epochs=n_epochs, learning_rate=lr,
                batch_size=1, bsize=16, min_train_masks=0, normalize=False, save_path=tmp_path,
                save_every=10**9, model_name="lr_capture",
            )
    finally:
        np.random.set_state(numpy_state)
    assert len(seen) == n_epochs  # one step per epoch
    return np.array(seen)


@pytest.mark.parametrize("n_epochs", [5, 50, 100, 300, 301, 500])
def test_cellpose_epoch_lrs_equal_train_seg(n_epochs: int, tmp_path, monkeypatch) -> None:
    lr = 3e-4
    reference = _train_seg_lrs(n_epochs, lr, tmp_path, monkeypatch)
    ours = cellpose_epoch_lrs(lr, n_epochs)
    assert ours.shape == (n_epochs,)
    np.testing.assert_array_equal(ours, reference)
    assert ours[0] == 0.0
    if n_epochs >= 100:
        assert ours[-1] == lr / 1024


def test_lr_at_step_cellpose_is_constant_within_an_epoch() -> None:
    cfg = ScheduleConfig(kind="cellpose", epochs=120)
    per_epoch = cellpose_epoch_lrs(1e-5, 120)
    steps = 7
    got = np.array([lr_at_step(cfg, 1e-5, s, steps) for s in range(total_steps(cfg, steps))]).reshape(120, steps)
    np.testing.assert_array_equal(got, np.repeat(per_epoch[:, None], steps, axis=1))
    assert lr_at_step(cfg, 1e-5, 10**6, steps) == per_epoch[-1]  # past the run: the last epoch's LR


def test_paper_schedule_2000_epochs_key_values() -> None:
    n = 2000
    assert paper_epoch_lr_factor(0, n) == 0.0
    assert paper_epoch_lr_factor(2.5, n) == pytest.approx(0.25)
    assert paper_epoch_lr_factor(5, n) == pytest.approx(0.5)
    assert paper_epoch_lr_factor(9.999, n) == pytest.approx(0.9999)
    assert paper_epoch_lr_factor(10, n) == 1.0
    assert paper_epoch_lr_factor(1000, n) == 1.0
    assert paper_epoch_lr_factor(1899.99, n) == 1.0
    assert paper_epoch_lr_factor(1900, n) == 0.1  # last 100 epochs
    assert paper_epoch_lr_factor(1949.5, n) == 0.1
    assert paper_epoch_lr_factor(1950, n) == 0.01  # last 50 epochs
    assert paper_epoch_lr_factor(1999.9, n) == 0.01


def test_paper_lr_at_step_ramps_per_step() -> None:
    cfg = ScheduleConfig(kind="paper", epochs=2000)
    base, steps = 5e-5, 4
    warm = [lr_at_step(cfg, base, s, steps) for s in range(41)]
    np.testing.assert_allclose(warm, base * np.arange(41) / 40, rtol=1e-12, atol=0)  # 0 at step 0, base at step 40
    epoch_of_step = np.arange(total_steps(cfg, steps)) / steps
    lrs = np.array([lr_at_step(cfg, base, s, steps) for s in range(0, total_steps(cfg, steps), 3)])
    expected = np.select(
        [epoch_of_step[::3] < 10, epoch_of_step[::3] < 1900, epoch_of_step[::3] < 1950],
        [base * epoch_of_step[::3] / 10, base, base / 10],
        base / 100,
    )
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def test_paper_schedule_short_runs() -> None:
    # 100 epochs: post-warm-up span 90, so the windows shrink to 45 and 22.5 epochs
    assert paper_epoch_lr_factor(5, 100) == pytest.approx(0.5)
    assert paper_epoch_lr_factor(54.99, 100) == 1.0
    assert paper_epoch_lr_factor(55, 100) == 0.1
    assert paper_epoch_lr_factor(77.49, 100) == 0.1
    assert paper_epoch_lr_factor(77.5, 100) == 0.01
    # 210 epochs is the shortest run with the paper's windows as given
    assert paper_epoch_lr_factor(109.99, 210) == 1.0 and paper_epoch_lr_factor(110, 210) == 0.1
    assert paper_epoch_lr_factor(160, 210) == 0.01
    # a run shorter than the warm-up ends inside it, without decay
    assert [paper_epoch_lr_factor(e, 6) for e in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # no warm-up, no decay
    assert paper_epoch_lr_factor(0, 50, warmup_epochs=0, decay1_epochs=0, decay2_epochs=0) == 1.0


def test_constant_kind() -> None:
    cfg = ScheduleConfig(kind="constant", epochs=3)
    assert {lr_at_step(cfg, 2e-4, s, 5) for s in range(15)} == {2e-4}


def _run(optimizer: torch.optim.Optimizer, scheduler, n_steps: int) -> list[float]:
    lrs = []
    for _ in range(n_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _fresh(cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.1)
    return optimizer, make_scheduler(optimizer, cfg, base_lr, steps_per_epoch)


@pytest.mark.parametrize("kind", ["paper", "cellpose", "constant"])
def test_lambda_lr_follows_lr_at_step(kind: str) -> None:
    cfg = ScheduleConfig(kind=kind, epochs=130, warmup_epochs=10, decay1_epochs=20, decay2_epochs=10)
    base, steps = 5e-5, 3
    optimizer, scheduler = _fresh(cfg, base, steps)
    lrs = _run(optimizer, scheduler, total_steps(cfg, steps))
    expected = [lr_at_step(cfg, base, s, steps) for s in range(total_steps(cfg, steps))]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=0)
    assert len(set(lrs)) > (1 if kind != "constant" else 0)


@pytest.mark.parametrize("kind", ["paper", "cellpose"])
@pytest.mark.parametrize("optimizer_first", [False, True])
def test_lambda_lr_state_round_trip_resumes_exactly(kind: str, optimizer_first: bool) -> None:
    cfg = ScheduleConfig(kind=kind, epochs=400)
    base, steps, stop = 5e-5, 2, 23  # stop mid warm-up ramp (paper) / mid epoch (cellpose)
    n = total_steps(cfg, steps)
    torch.manual_seed(0)
    optimizer, scheduler = _fresh(cfg, base, steps)
    uninterrupted = _run(optimizer, scheduler, n)

    optimizer, scheduler = _fresh(cfg, base, steps)
    first_part = _run(optimizer, scheduler, stop)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # the scheduler state holds plain data only

    model = nn.Linear(2, 1)
    resumed_optimizer = torch.optim.AdamW(model.parameters(), lr=base, weight_decay=0.1)
    if optimizer_first:
        resumed_optimizer.load_state_dict(state["optimizer"])
        resumed = make_scheduler(resumed_optimizer, cfg, base, steps)
    else:
        resumed = make_scheduler(resumed_optimizer, cfg, base, steps)
        resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    second_part = _run(resumed_optimizer, resumed, n - stop)
    assert first_part + second_part == uninterrupted
    assert uninterrupted[stop] != uninterrupted[0]


def test_omegaconf_structured_config_and_overrides() -> None:
    schema = OmegaConf.structured(ScheduleConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(["kind=cellpose", "epochs=500"]))
    assert lr_at_step(cfg, 1e-3, 0, 4) == 0.0
    assert lr_at_step(cfg, 1e-3, 4 * 499, 4) == cellpose_epoch_lrs(1e-3, 500)[-1]
    as_object = OmegaConf.to_object(cfg)
    assert isinstance(as_object, ScheduleConfig) and as_object.epochs == 500
    assert steps_per_epoch_for(ScheduleConfig(samples_per_epoch=800), 256) == 4
    assert steps_per_epoch_for(ScheduleConfig(samples_per_epoch=800), 1) == 800


def test_bad_input_raises_value_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        lr_at_step(ScheduleConfig(kind="cosine"), 1e-4, 0, 1)
    with pytest.raises(ValueError, match="decay2"):
        paper_epoch_lr_factor(1, 100, decay1_epochs=10, decay2_epochs=20)
    with pytest.raises(ValueError, match="epoch"):
        paper_epoch_lr_factor(-1, 100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at_step(ScheduleConfig(), 1e-4, 0, 0)
    with pytest.raises(ValueError, match="n_epochs"):
        cellpose_epoch_lrs(1e-4, 0)
    optimizer = torch.optim.AdamW(nn.Linear(2, 1).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="base_lr"):
        make_scheduler(optimizer, ScheduleConfig(), 5e-5, 10)
