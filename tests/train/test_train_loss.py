"""train.loss against cellpose 4's `_loss_fn_seg` / `_loss_fn_class`, on random and real (shared/data) targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose.train import _loss_fn_class, _loss_fn_seg
from conftest import read_shared_masks

from cpsam.dynamics import masks_to_flows
from train.loss import (
    FLOW_SCALE,
    cellpose_loss,
    cellpose_loss_terms,
    class_loss,
    class_weights_from_counts,
)

CPU = torch.device("cpu")
TOL = 1e-6


def _random_batch(seed: int, batch: int = 2, size: int = 48, n_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """output (B, K + 3, H, W) random logits/flows; target (B, 3, H, W) [cellprob in [0, 1], unit-ish dY, dX]."""
    gen = torch.Generator().manual_seed(seed)
    output = 3.0 * torch.randn(batch, n_classes + 3, size, size, generator=gen)
    target = torch.cat(
        [torch.rand(batch, 1, size, size, generator=gen), torch.randn(batch, 2, size, size, generator=gen)], dim=1
    )
    return output, target


def _subset(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (1, C, 1, N): the kept pixels of every image side by side, so cellpose's plain means run over
    exactly those pixels."""
    picked = tensor.permute(1, 0, 2, 3)[:, keep]
    return picked[None, :, None, :]


@pytest.fixture(scope="module")
def real_batch() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Targets from two real annotated images (200x200 each): [masks > 0, dY, dX] via cpsam.dynamics, a noisy
    prediction near 5x those flows, and the label images."""
    pairs = [("bact_phase_neurips22", "neurips22_cell_00528"),
             ("fluo_nuclei_deepcell2016", "deepcell2016_training_nuclei_set5_crop")]
    masks = np.stack([read_shared_masks(folder, name)[:200, :200] for folder, name in pairs])
    targets = [np.concatenate([(m > 0)[None].astype(np.float32), masks_to_flows(m)]) for m in masks]
    target = torch.from_numpy(np.stack(targets))
    gen = torch.Generator().manual_seed(7)
    flows = FLOW_SCALE * target[:, 1:] + 0.8 * torch.randn(target[:, 1:].shape, generator=gen)
    logit = 4.0 * (target[:, :1] - 0.5) + torch.randn(target[:, :1].shape, generator=gen)
    return torch.cat([flows, logit], dim=1), target, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_cellpose_on_random_tensors(seed: int) -> None:
    output, target = _random_batch(seed)
    expected = _loss_fn_seg(target, output, CPU)
    assert torch.allclose(cellpose_loss(output, target), expected, rtol=0, atol=TOL)
    ones = torch.ones(output.shape[0], *output.shape[2:])
    assert torch.allclose(cellpose_loss(output, target, ones), expected, rtol=0, atol=TOL)
    assert torch.allclose(cellpose_loss(output, target, ones.bool()), expected, rtol=0, atol=TOL)


def test_terms_add_up_and_match_their_definitions() -> None:
    output, target = _random_batch(3)
    terms = cellpose_loss_terms(output, target)
    assert terms.loss.dtype == torch.float32 and terms.loss.ndim == 0
    assert torch.allclose(terms.loss, terms.flow + terms.cellprob, rtol=0, atol=TOL)
    flow_mse = torch.nn.functional.mse_loss(output[:, :2], FLOW_SCALE * target[:, 1:]) / 2
    bce = torch.nn.functional.binary_cross_entropy_with_logits(output[:, 2], (target[:, 0] > 0.5).float())
    assert torch.allclose(terms.flow, flow_mse, rtol=0, atol=TOL)
    assert torch.allclose(terms.cellprob, bce, rtol=0, atol=TOL)
    assert terms.flow > 1.0 and terms.cellprob > 0.1  # random predictions: far from the target


def test_extra_class_channels_are_ignored_like_cellpose() -> None:
    output, target = _random_batch(4, n_classes=5)
    expected = _loss_fn_seg(target, output, CPU)
    assert torch.allclose(cellpose_loss(output, target), expected, rtol=0, atol=TOL)
    assert torch.allclose(cellpose_loss(output, target), cellpose_loss(output[:, -3:], target), rtol=0, atol=0)


def test_equals_cellpose_on_real_targets(real_batch) -> None:
    output, target, masks = real_batch
    assert (target[:, 0] > 0).float().mean() > 0.05  # real foreground
    norms = target[:, 1:].norm(dim=1)[torch.from_numpy(masks > 0)]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)  # unit flows inside the objects
    expected = _loss_fn_seg(target, output, CPU)
    assert torch.allclose(cellpose_loss(output, target), expected, rtol=0, atol=TOL)
    # a perfect prediction leaves only the BCE of finite logits
    perfect = torch.cat([FLOW_SCALE * target[:, 1:], 20.0 * (target[:, :1] - 0.5)], dim=1)
    terms = cellpose_loss_terms(perfect, target)
    assert terms.flow.item() == 0.0 and terms.cellprob.item() < 1e-4


def test_valid_rectangle_equals_cellpose_on_the_crop(real_batch) -> None:
    output, target, _ = real_batch
    valid = torch.zeros(output.shape[0], *output.shape[2:], dtype=torch.bool)
    valid[:, 30:130, 50:170] = True
    expected = _loss_fn_seg(target[:, :, 30:130, 50:170], output[:, :, 30:130, 50:170], CPU)
    got = cellpose_loss(output, target, valid)
    assert torch.allclose(got, expected, rtol=0, atol=TOL)
    assert abs(got.item() - cellpose_loss(output, target).item()) > 1e-3  # the mask changed the answer


@pytest.mark.parametrize("source", ["random", "real"])
def test_valid_arbitrary_mask_equals_cellpose_on_the_kept_pixels(source: str, real_batch) -> None:
    if source == "random":
        output, target = _random_batch(5)
    else:
        output, target, _ = real_batch
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(output.shape[0], *output.shape[2:], generator=gen) > 0.3
    expected = _loss_fn_seg(_subset(target, keep), _subset(output, keep), CPU)
    terms = cellpose_loss_terms(output, target, keep.float())
    assert torch.allclose(terms.loss, expected, rtol=0, atol=TOL)
    kept_output, kept_target = _subset(output, keep), _subset(target, keep)
    flow_expected = torch.nn.functional.mse_loss(kept_output[:, :2], FLOW_SCALE * kept_target[:, 1:]) / 2
    assert torch.allclose(terms.flow, flow_expected, rtol=0, atol=TOL)


def test_ignored_pixels_do_not_leak_nan_or_gradient() -> None:
    output, target = _random_batch(6)
    keep = torch.ones(output.shape[0], *output.shape[2:], dtype=torch.bool)
    keep[:, :10] = False
    expected = cellpose_loss(output, target, keep)
    poisoned_target = target.clone()
    poisoned_target[:, :, :10] = float("nan")
    poisoned_output = output.clone()
    poisoned_output[:, :, :10] = float("inf")
    poisoned_output.requires_grad_(True)
    loss = cellpose_loss(poisoned_output, poisoned_target, keep)
    assert torch.isfinite(loss) and torch.allclose(loss, expected, rtol=0, atol=TOL)
    loss.backward()
    assert torch.isfinite(poisoned_output.grad).all()
    assert (poisoned_output.grad[:, :, :10] == 0).all() and (poisoned_output.grad[:, :, 10:] != 0).any()


def test_all_ignored_gives_zero_with_a_graph() -> None:
    output, target = _random_batch(8)
    output.requires_grad_(True)
    terms = cellpose_loss_terms(output, target, torch.zeros(output.shape[0], *output.shape[2:]))
    for value in terms:
        assert value.item() == 0.0 and value.requires_grad
    terms.loss.backward()
    assert output.grad is not None and torch.isfinite(output.grad).all() and (output.grad == 0).all()


def test_bf16_output_under_autocast_is_computed_in_float32() -> None:
    output, target = _random_batch(9)
    output_bf16 = output.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        terms = cellpose_loss_terms(output_bf16, target)
    assert terms.loss.dtype == torch.float32
    expected = _loss_fn_seg(target, output_bf16.detach().float(), CPU)  # cellpose on the same bf16 values, fp32
    assert torch.allclose(terms.loss, expected, rtol=0, atol=TOL)
    terms.loss.backward()
    assert output_bf16.grad.dtype == torch.bfloat16 and output_bf16.grad.abs().sum() > 0


def test_gradient_matches_cellpose() -> None:
    output, target = _random_batch(10)
    ours = output.clone().requires_grad_(True)
    theirs = output.clone().requires_grad_(True)
    cellpose_loss(ours, target).backward()
    _loss_fn_seg(target, theirs, CPU).backward()
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("output_shape", "target_shape", "valid_shape"),
    [
        ((2, 2, 8, 8), (2, 3, 8, 8), None),
        ((2, 3, 8, 8), (2, 4, 8, 8), None),
        ((2, 3, 8, 8), (2, 3, 8, 9), None),
        ((2, 3, 8, 8), (2, 3, 8, 8), (2, 1, 8, 8)),
        ((3, 8, 8), (3, 8, 8), None),
    ],
)
def test_bad_shapes_raise_value_error(output_shape, target_shape, valid_shape) -> None:
    valid = None if valid_shape is None else torch.ones(valid_shape)
    with pytest.raises(ValueError):
        cellpose_loss(torch.zeros(output_shape), torch.zeros(target_shape), valid)


# ---- class head --------------------------------------------------------------------------------------------


def _class_batch(seed: int, n_classes: int = 5, batch: int = 2, size: int = 40):
    """Random class logits (B, K, H, W), labels (B, H, W) int64 and cellpose's layout of both: y = [classes...,
    dY, dX, cp] and lbl = [class label, cp, dY, dX]."""
    output, target = _random_batch(seed, batch=batch, size=size, n_classes=n_classes)
    gen = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, n_classes, (batch, size, size), generator=gen)
    lbl = torch.cat([labels[:, None].float(), target], dim=1)
    return output[:, :n_classes], labels, output, lbl


@pytest.mark.parametrize("weighted", [False, True])
def test_class_loss_equals_cellpose(weighted: bool) -> None:
    logits, labels, y, lbl = _class_batch(20)
    weights = torch.tensor([0.5, 2.0, 7.0, 1.0, 3.5]) if weighted else None
    expected = _loss_fn_class(lbl, y, class_weights=weights)
    got = class_loss(logits, labels, weights)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=TOL)
    ones = torch.ones_like(labels)
    assert torch.allclose(class_loss(logits, labels, weights, valid=ones), expected, rtol=0, atol=TOL)


def test_class_loss_valid_equals_cellpose_on_kept_pixels() -> None:
    logits, labels, y, lbl = _class_batch(21)
    keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    weights = torch.tensor([0.2, 1.0, 4.0, 9.0, 2.0])
    expected = _loss_fn_class(_subset(lbl, keep), _subset(y, keep), class_weights=weights)
    bad_labels = torch.where(keep, labels, -7)  # ignored pixels may carry any value
    got = class_loss(logits, bad_labels, weights, valid=keep)
    assert torch.allclose(got, expected, rtol=0, atol=TOL)
    assert abs(got.item() - class_loss(logits, labels, weights).item()) > 1e-4


def test_class_loss_all_ignored_and_bf16() -> None:
    logits, labels, _, lbl = _class_batch(22)
    logits_bf16 = logits.to(torch.bfloat16).requires_grad_(True)
    zero = class_loss(logits_bf16, labels, torch.ones(5), valid=torch.zeros_like(labels))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert (logits_bf16.grad == 0).all()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = class_loss(logits_bf16, labels)
    assert got.dtype == torch.float32
    y = torch.cat([logits_bf16.detach().float(), torch.zeros(2, 3, 40, 40)], dim=1)
    assert torch.allclose(got, _loss_fn_class(lbl, y), rtol=0, atol=TOL)


def test_class_loss_bad_input() -> None:
    logits, labels, _, _ = _class_batch(23)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        class_loss(logits, labels + 1)
    with pytest.raises(ValueError, match="integer"):
        class_loss(logits, labels.float())
    with pytest.raises(ValueError, match="class_weights"):
        class_loss(logits, labels, torch.ones(4))
    with pytest.raises(ValueError, match="class_labels"):
        class_loss(logits, labels[:, :-1])


def _semantic_py_pclass(class_maps: list[np.ndarray], n_classes: int) -> np.ndarray:
    """pclass as cellpose's paper/cpsam/semantic.py computes it (that script is not part of the installed package,
    so its two lines are restated here): per image the fraction of pixels of each class, then the mean over
    images."""
    pclass_img = np.zeros((len(class_maps), n_classes))
    for c in range(n_classes):
        pclass_img[:, c] = np.array([(tl == c).mean() for tl in class_maps])
    return pclass_img.mean(axis=0)


def test_class_weights_from_counts_match_semantic_py_and_feed_cellpose() -> None:
    rng = np.random.default_rng(0)
    n_classes = 5
    # images of different sizes with skewed class frequencies, so per-image and pooled fractions differ
    class_maps = [
        rng.choice(n_classes, size=shape, p=p)
        for shape, p in [((30, 40), [0.7, 0.1, 0.1, 0.05, 0.05]), ((64, 64), [0.4, 0.3, 0.1, 0.1, 0.1]),
                         ((20, 25), [0.9, 0.02, 0.03, 0.03, 0.02])]
    ]
    counts = np.stack([np.bincount(m.ravel(), minlength=n_classes) for m in class_maps])
    weights = class_weights_from_counts(counts)
    pclass = _semantic_py_pclass(class_maps, n_classes)
    assert weights.dtype == torch.float32 and weights.shape == (n_classes,)
    # train_seg's conversion of `class_weights=1./pclass`: torch.from_numpy(...).float()
    assert torch.equal(weights, torch.from_numpy(1.0 / pclass).float())
    pooled = class_weights_from_counts(torch.from_numpy(counts.sum(axis=0)))
    assert torch.allclose(pooled, torch.from_numpy(counts.sum() / counts.sum(axis=0)).float(), rtol=1e-6)
    assert not torch.allclose(pooled, weights, rtol=1e-3)  # pooling is a different estimate with unequal sizes

    # the weights drive cellpose's own class loss the same way they drive ours
    logits, labels, y, lbl = _class_batch(24, n_classes=n_classes)
    expected = _loss_fn_class(lbl, y, class_weights=weights)
    assert torch.allclose(class_loss(logits, labels, weights), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "counts",
    [np.array([3, 0, 2]), np.array([[1, 2], [0, 0]]), np.array([-1, 4]), np.zeros((2, 2, 2)), np.array([0, 0])],
)
def test_class_weights_bad_counts(counts: np.ndarray) -> None:
    with pytest.raises(ValueError):
        class_weights_from_counts(counts)
