"""Distillation core: KD loss numbers, the seed's feature-term flaw, adapters, student maps, teachers, ensembles,
student input and the objective's config checks (fast; no training run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsam.models import create_model
from cpsam.segment import Segmenter
from distill.losses import FeatureAdapter, cellprob_kd_loss, feature_loss, kd_loss
from distill.student import match_student_feature, student_feature_shapes, student_forward
from distill.student_input import brightness_factor, flat_field_correct, student_view
from distill.teachers import Ensemble, Teacher, TeacherError
from train.config import ConfigError, load_config
from train.loss import cellpose_loss_terms


def _bce(logit: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.maximum(logit, 0) - logit * target + np.log1p(np.exp(-np.abs(logit)))


def _pair(seed: int = 0, shape=(2, 3, 5, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3


def test_kd_loss_equals_a_hand_computation():
    s, t = _pair(0)
    fs, ft = _pair(1, (2, 8, 3, 3))
    terms = kd_loss(s, t, fs, ft, alpha=2.0, beta=1.0, temperature=1.0)
    sn, tn, fsn, ftn = (a.double().numpy() for a in (s, t, fs, ft))
    flow = ((sn[:, :2] - tn[:, :2]) ** 2).mean() / 2
    cellprob = _bce(sn[:, 2], 1 / (1 + np.exp(-tn[:, 2]))).mean()
    feature = ((ftn - fsn) ** 2).mean()
    assert float(terms.flow) == pytest.approx(flow, rel=1e-5)
    assert float(terms.cellprob) == pytest.approx(cellprob, rel=1e-5)
    assert float(terms.feature) == pytest.approx(feature, rel=1e-5)
    assert float(terms.loss) == pytest.approx(2 * feature + flow + cellprob, rel=1e-5)
    # the flow term is train.loss's flow term against the unit target teacher / 5 (the FLOW_SCALE convention)
    target = torch.cat([torch.zeros_like(t[:, :1]), t[:, :2] / 5.0], dim=1)
    assert float(terms.flow) == pytest.approx(float(cellpose_loss_terms(s, target).flow), rel=1e-6)


def test_temperature_scales_logits_and_keeps_the_gradient_scale():
    s, t = _pair(2)
    value = float(cellprob_kd_loss(s, t, temperature=2.0))
    sn, tn = s.double().numpy(), t.double().numpy()
    expected = 4.0 * _bce(sn[:, 2] / 2, 1 / (1 + np.exp(-tn[:, 2] / 2))).mean()
    assert value == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        cellprob_kd_loss(s, t, temperature=0.0)


def test_seed_feature_term_is_zero_when_errors_cancel_but_mse_is_not():
    teacher = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    signs = torch.ones(2, 32, 8, 8)
    signs[:, :, ::2] = -1.0  # +1 / -1 rows: the errors cancel exactly
    student = teacher + 0.5 * signs
    assert float(feature_loss(student, teacher, "distillcellsegtrack")) == pytest.approx(0.0, abs=1e-10)
    assert float(feature_loss(student, teacher, "mse")) == pytest.approx(0.25, rel=1e-6)
    # a uniform offset is the only error the seed's term sees: (mean diff)^2 = MSE there
    assert float(feature_loss(teacher + 0.5, teacher, "distillcellsegtrack")) == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError, match="feature loss"):
        feature_loss(student, teacher, "l1")


def test_no_feature_term_still_has_a_graph():
    s, t = _pair(4)
    s.requires_grad_(True)
    terms = kd_loss(s, t)
    assert float(terms.feature.detach()) == 0.0
    terms.loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_adapter_maps_student_channels_and_size_to_the_teacher():
    adapter = FeatureAdapter((64, 64, 64), (32, 16, 16))
    assert not adapter.is_identity and adapter.proj is not None
    x = torch.randn(2, 64, 64, 64, requires_grad=True)
    y = adapter(x)
    assert tuple(y.shape) == (2, 32, 16, 16)
    # area resize by an integer factor is a 4 x 4 average pool of the 1x1 conv output
    assert torch.allclose(y, F.avg_pool2d(adapter.proj(x), 4), atol=1e-5)
    y.square().mean().backward()
    assert adapter.proj.weight.grad is not None and float(adapter.proj.weight.grad.abs().sum()) > 0
    up = FeatureAdapter((8, 4, 4), (8, 16, 16))
    assert up.proj is None and tuple(up(torch.randn(1, 8, 4, 4)).shape) == (1, 8, 16, 16)
    same = FeatureAdapter((32, 224, 224), (32, 224, 224))
    assert same.is_identity and sum(p.numel() for p in same.parameters()) == 0


def test_student_maps_match_the_teacher_maps():
    torch.manual_seed(0)
    deep = create_model("cpnet", nbase=[1, 32, 64, 128, 256])
    shapes = student_feature_shapes(deep, 256, 1)
    assert shapes["decoder"] == (32, 256, 256) and shapes["encoder3"] == (256, 32, 32)
    assert deep.training  # the dry run restores train mode
    # CP-SAM's neck (256 x 32 x 32 on a 256-px tile) is the deepest encoder map's shape: no adapter needed
    assert match_student_feature(shapes, (256, 32, 32), 256) == "encoder3"
    assert match_student_feature(shapes, (32, 256, 256), 256) == "decoder"
    small = create_model("cpnet", nbase=[1, 32, 64])
    small_shapes = student_feature_shapes(small, 128, 1)
    assert match_student_feature(small_shapes, (32, 16, 16), 128) == "encoder1"
    x = torch.randn(2, 1, 128, 128)
    out, fmap = student_forward(small, x, "encoder1")
    assert tuple(out.shape) == (2, 3, 128, 128) and tuple(fmap.shape) == (2, 64, 64, 64)
    out2, dec = student_forward(small, x, "decoder")
    assert torch.allclose(out, out2, atol=1e-6) and tuple(dec.shape) == (2, 32, 128, 128)


def _cpnet_teacher(seed: int, nbase=(2, 16, 32), diam_mean: float = 30.0) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(create_model("cpnet", nbase=list(nbase), diam_mean=diam_mean), f"random-{seed}")


def test_teacher_is_frozen_and_yields_output_and_features():
    teacher = _cpnet_teacher(0)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    x = torch.randn(3, 3, 64, 64)  # more channels than the teacher reads: the first two are used
    out = teacher.teach(x)
    ref = teacher.model(x[:, :2])
    assert torch.equal(out.output, ref[0]) and torch.equal(out.features["decoder"], ref[2])
    assert teacher.feature_shapes(64) == {"decoder": (16, 64, 64)}
    with pytest.raises(TeacherError, match="no feature map 'neck'"):
        teacher.teach(x, ["neck"])
    with pytest.raises(TeacherError, match="needs"):
        teacher.teach(torch.randn(1, 1, 64, 64))


def test_cpsam_teacher_gives_neck_readout_and_its_output():
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", tile_size=128)
    teacher = Teacher(model)
    x = torch.randn(2, 3, 128, 128)
    out = teacher.teach(x)
    assert tuple(out.features["neck"].shape) == (2, 32, 16, 16)
    assert tuple(out.features["readout"].shape) == (2, 192, 16, 16)
    assert torch.allclose(out.output, model(x)[0], atol=1e-5)
    assert teacher.feature_shapes(128) == {"neck": (32, 16, 16), "readout": (192, 16, 16)}
    assert teacher.default_feature == "neck"
    with pytest.raises(TeacherError, match="128 x 128 tiles"):
        teacher.teach(torch.randn(1, 3, 64, 64))


def test_ensemble_averages_raw_outputs_and_keeps_the_first_members_features():
    a, b = _cpnet_teacher(1), _cpnet_teacher(2)
    ensemble = Ensemble([a, b])
    x = torch.randn(2, 2, 64, 64)
    out = ensemble.teach(x)
    assert torch.allclose(out.output, (a.teach(x).output + b.teach(x).output) / 2, atol=1e-6)
    assert torch.equal(out.features["decoder"], a.teach(x).features["decoder"])
    assert ensemble.specs == ["random-1", "random-2"]
    # the ensemble net segments whole images through the public API
    image = np.random.default_rng(0).random((80, 90)).astype(np.float32)
    result = Segmenter(ensemble.net, rules=ensemble.rules).segment([image], diameter=30.0)[0]
    assert result.dP.shape == (2, 80, 90)
    with pytest.raises(TeacherError, match="different cell diameters"):
        Ensemble([a, _cpnet_teacher(3, diam_mean=17.0)])


def test_flat_field_flattens_an_illumination_gradient():
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    constant = torch.full((1, 1, 96, 96), 0.5)
    assert torch.allclose(flat_field_correct(constant), constant, atol=1e-5)
    shaded = constant * (0.5 + x / 95.0)[None, None]  # illumination falling from right to left
    corrected = flat_field_correct(shaded, sigma=30.0)
    assert float(corrected.std()) < 0.5 * float(shaded.std())
    zero = torch.zeros(1, 1, 32, 32)  # an empty channel stays empty (no division by ~0)
    assert torch.equal(flat_field_correct(zero), zero)


def test_student_view_cuts_channels_and_applies_brightness():
    crop = torch.randn(4, 2, 16, 16)
    view = student_view(crop, 1, brightness=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert tuple(view.shape) == (4, 1, 16, 16)
    assert torch.allclose(view[1], 2.0 * crop[1, :1]) and torch.allclose(view[0], crop[0, :1])
    factors = [brightness_factor(0, 0, p, 0.5, 0.1, 3.0) for p in range(400)]
    assert factors == [brightness_factor(0, 0, p, 0.5, 0.1, 3.0) for p in range(400)]  # a function of the key
    applied = [f for f in factors if f != 1.0]
    assert 0.4 < len(applied) / 400 < 0.6 and min(applied) >= 0.1 and max(applied) <= 3.0
    assert brightness_factor(0, 0, 1, 0.5, 0.1, 0.0) == 1.0


@pytest.mark.parametrize(("override", "message"), [
    ("kd.loss=l1", "kd.loss"), ("kd.features=style", "kd.features"), ("kd.temperature=0", "kd.temperature"),
    ("kd.brightness=0.05", "kd.brightness"),
])
def test_objective_refuses_bad_kd_values(override, message):
    from train.objective import objective_for

    cfg = load_config(None, ["objective=distill", "kd.teacher=[cyto_0]", override])
    with pytest.raises(ConfigError, match=message):
        objective_for(cfg)


def test_objective_needs_a_teacher():
    from train.objective import objective_for

    with pytest.raises(ConfigError, match="kd.teacher is empty"):
        objective_for(load_config(None, ["objective=distill"]))
    obj = objective_for(load_config(None, ["objective=distill", "kd.teacher=[cyto_0]", "kd.gt_weight=0.5"]))
    assert obj.term_names == ("kd_feature", "kd_flow", "kd_cellprob", "gt_flow", "gt_cellprob")
    assert math.isclose(obj.cfg.kd.alpha, 2.0)
