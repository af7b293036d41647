"""The distillation students: every registry name builds, shapes, checkpoints, Segmenter, fused BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_image_path

from cpsam.models import CPnet, create_model, list_models, load_model, save_checkpoint
from cpsam.models.students import FastNet, cpnet_student_names, fastnet_names, student_names
from cpsam.segment import Segmenter, rules_for


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)


def test_every_student_name_is_registered():
    names = student_names()
    assert len(cpnet_student_names()) == 8 and len(fastnet_names()) == 12
    assert {"cpnet-1-32", "cpnet-1-32-64", "cpnet-1-32-64-128", "cpnet-1-32-64-128-256", "cpnet-2-32-64"} <= set(names)
    assert set(names) <= set(list_models())


@pytest.mark.parametrize("name", cpnet_student_names())
def test_cpnet_students_build_with_their_nbase(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    nbase = [int(v) for v in name.split("-")[1:]]
    assert isinstance(model, CPnet) and model.nbase == nbase and model.model_name == "cpnet"
    x = torch.randn(2, nbase[0], 64, 48)
    with torch.inference_mode():
        out, style, feat = model(x)
    assert out.shape == (2, 3, 64, 48) and style.shape == (2, nbase[-1]) and feat.shape == (2, 32, 64, 48)
    assert torch.allclose(style.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", fastnet_names())
def test_fastnet_students_shapes_any_size(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    c = int(name.split("-")[1])
    assert isinstance(model, FastNet) and model.in_channels == c and model.tile_size == 224
    assert model.feature_channels == 32 and model.feature_stride == 2
    assert model.diam_mean.dtype == torch.float32 and model.diam_mean.shape == (1,)
    x = torch.randn(1, c, 70, 90)  # not a multiple of the stride: padded inside, cropped back
    with torch.inference_mode():
        out, style, feat = model(x)
    assert out.shape == (1, 3, 70, 90) and style.shape == (1, model.style_channels)
    assert feat.shape[:2] == (1, 32) and feat.shape[2] * 2 >= 70 and feat.shape[3] * 2 >= 90
    assert torch.isfinite(out).all()


def test_fastnet_pads_odd_sizes_with_zeros_and_crops_back():
    """A 220 x 200 input equals the 224 x 208 zero-padded input cropped back (stride 16: pad inside)."""
    torch.manual_seed(1)
    model = create_model("fastnet-1-32-64-128-256").eval()
    assert model.stride == 16
    x = torch.randn(1, 1, 220, 200)
    with torch.inference_mode():
        a = model(x)[0]
        b = model(torch.nn.functional.pad(x, (0, 8, 0, 4)))[0]
    assert a.shape == (1, 3, 220, 200)
    assert torch.allclose(a, b[..., :220, :200], atol=1e-6)


@pytest.mark.parametrize("name", ["cpnet-1-32-64", "cpnet-2-32-64-128-256", "fastnet-1-32-64-128-256", "fastnet-2-r18"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(2)
    model = create_model(name)
    _randomize_batchnorm(model)
    model.diam_mean.data.fill_(27.0)
    model.diam_labels.data.fill_(21.5)
    path = save_checkpoint(tmp_path / "model.pt", model.eval(), teacher="cyto_0")
    loaded = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert float(loaded.diam_mean[0]) == 27.0 and float(loaded.diam_labels[0]) == 21.5
    x = torch.randn(1, model.in_channels, 96, 96)
    with torch.inference_mode():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert rules_for(loaded).mask_rules == ("cp3" if isinstance(model, CPnet) else "cp4")


def test_recorded_rules_and_channels_apply_to_any_student(tmp_path):
    """A FastNet distilled from cyto_0 keeps the teacher's cellpose-3 mask rules and channels (model.pt's
    `inference`), so `cpsam segment` without --channels does what the teacher's labels were made with."""
    import numpy as np

    from cpsam.segment import Segmenter

    torch.manual_seed(5)
    model = create_model("fastnet-2-32-64-128-256").eval()
    plain = load_model(save_checkpoint(tmp_path / "plain.pt", model))
    assert rules_for(plain).mask_rules == "cp4" and Segmenter(plain).default_channels is None
    path = save_checkpoint(tmp_path / "model.pt", model, inference={"mask_rules": "cp3", "channels": [2, 1]})
    loaded = load_model(path)
    assert rules_for(loaded).mask_rules == "cp3" and rules_for(loaded).tile_size == rules_for(plain).tile_size
    seg = Segmenter(loaded)
    assert seg.rules.mask_rules == "cp3" and seg.default_channels == [2, 1]
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32) * 100
    default = seg.segment([image], diameter=30, channel_axis=0)[0]
    given = seg.segment([image], diameter=30, channel_axis=0, channels=[2, 1])[0]
    first = seg.segment([image], diameter=30, channel_axis=0, channels=[1, 2])[0]
    assert np.array_equal(default.dP, given.dP) and not np.array_equal(default.dP, first.dP)


@pytest.mark.parametrize("name", ["fastnet-1-32-64-128-256", "fastnet-2-16-32-64-128", "fastnet-1-r18"])
def test_fused_batchnorm_equals_unfused(name):
    torch.manual_seed(3)
    model = create_model(name)
    _randomize_batchnorm(model, seed=4)
    model.eval()
    fused = model.fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(2, model.in_channels, 128, 160)
    with torch.inference_mode():
        ref, style_ref, feat_ref = model(x)
        out, style, feat = fused(x)
    scale = float(ref.abs().max())
    assert scale > 0.1
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, scale)
    assert float((feat - feat_ref).abs().max()) <= 1e-5 * max(1.0, float(feat_ref.abs().max()))
    assert torch.allclose(style, style_ref, atol=1e-5)


def test_channels_last_does_not_change_the_output():
    torch.manual_seed(5)
    a = create_model("fastnet-1-32-64-128-256").eval()
    b = create_model("fastnet", **{**a.model_kwargs(), "channels_last": False}).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 112, 112)
    with torch.inference_mode():
        assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)


def test_student_checkpoint_runs_in_segmenter_and_cpsam_segment(tmp_path):
    pair = shared_image_path("bact_phase_neurips22", "neurips22_cell_00528")
    from cpsam import io
    from cpsam.cli import main

    torch.manual_seed(6)
    model = create_model("fastnet-1-32-64")
    model.diam_mean.data.fill_(27.0)
    model.diam_labels.data.fill_(27.0)
    ckpt = save_checkpoint(tmp_path / "run" / "model.pt", model.eval())
    image = io.read_image(pair)
    result = Segmenter(load_model(ckpt)).segment([image], diameter=20.0)[0]
    assert result.masks.shape == image.shape[:2] and result.dP.shape == (2, *image.shape[:2])
    assert result.rescale == pytest.approx(27.0 / 20.0)
    out = tmp_path / "out"
    code = main(["segment", "--model", str(tmp_path / "run"), "--input", str(pair), "--output", str(out),
                 "--diameter", "20"])
    assert code == 0
    masks = io.read_labels(out / "neurips22_cell_00528_img_masks.tif")
    assert masks.shape == image.shape[:2]
    assert np.array_equal(masks, result.masks)
