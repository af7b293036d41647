"""distill.teacher_init (kd.init_from_teacher): a student starts from its teacher's weights where they fit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cpnet

from cpsam.models import create_model
from distill.teacher_init import init_from_teacher


def _gray(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A 2-channel cyto_0 input of a grayscale image (channels 0 0): the second channel is all zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, size, size, generator=gen)
    x[:, 1] = 0
    return x


def _teacher(seed: int = 0, nbase=(2, 32, 64, 128, 256)) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model("cpnet", nbase=list(nbase))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained net has
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_a_student_of_the_teachers_shape_starts_as_the_teacher_on_grayscale() -> None:
    teacher = _teacher()
    torch.manual_seed(1)
    student = create_model("cpnet-1-32-64-128-256")
    report = init_from_teacher(student, teacher)
    assert report.fraction == 1.0 and not [k for k in report.kept if not k.endswith("num_batches_tracked")]
    # the input layer (its BatchNorm over the 2 input channels and its convolutions) is cut to channel 0
    assert report.sliced and all("down" in name for name in report.sliced)
    x = _gray(1, 256)
    with torch.no_grad():
        error = (student.eval()(x[:, :1])[0] - teacher(x)[0]).abs()
    # the teacher's BatchNorm turns the zero channel into a constant, folded into the first biases: exact inside;
    # at the border the teacher's zero padding differs from the constant (spread inwards by the deeper levels)
    assert float(error[..., 32:-32, 32:-32].max()) < 1e-5
    assert float(error.max()) < 1e-2


def test_a_smaller_student_keeps_the_teachers_shallow_levels() -> None:
    teacher = _teacher()
    torch.manual_seed(1)
    student = create_model("cpnet-1-32-64")
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    report = init_from_teacher(student, teacher)
    state, theirs = student.state_dict(), teacher.state_dict()
    assert report.folded == ["downsample.down.res_down_0.conv.conv_0.2.bias", "downsample.down.res_down_0.proj.1.bias"]
    for name in report.copied:
        assert torch.equal(state[name], theirs[name]) != (name in report.folded), name
    for name in report.kept:  # left as built (e.g. the style projections: the deepest map has 64, not 256, channels)
        assert torch.equal(state[name], fresh[name]), name
    assert any("full" in name for name in report.kept)
    assert 0.3 < report.fraction < 1.0, report.summary()
    # the full-resolution down block sees the same input: its output is the teacher's
    x = _gray()
    with torch.no_grad():
        got = student.eval().downsample(x[:, :1])[0]
        want = teacher.downsample(x)[0]
    assert torch.allclose(got[..., 4:-4, 4:-4], want[..., 4:-4, 4:-4], rtol=1e-5, atol=1e-5)  # 4 convs: 4 px border
    assert not torch.allclose(got, create_model("cpnet-1-32-64").eval().downsample(x[:, :1])[0], atol=1e-2)


def test_the_students_own_scale_is_not_copied() -> None:
    # kd.student_scale=0.5: a twin of the teacher at half its diam_mean must keep its own diam_mean (and its
    # diam_labels), or it segments at the teacher's scale what it learned at half of it
    teacher = _teacher()
    teacher.diam_mean.fill_(27.0)
    teacher.diam_labels.fill_(27.0)
    student = create_model("cpnet-1-32-64-128-256", diam_mean=13.5)
    student.diam_labels.fill_(29.6)
    report = init_from_teacher(student, teacher)
    assert float(student.diam_mean) == 13.5 and abs(float(student.diam_labels) - 29.6) < 1e-6
    assert "diam_mean" not in report.copied and "diam_labels" not in report.copied
    assert report.fraction == 1.0
    name = "downsample.down.res_down_0.conv.conv_0.0.running_var"  # cut to the input channel, still the teacher's
    assert torch.equal(student.state_dict()[name], teacher.state_dict()[name][:1])


def test_another_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="no tensor of the teacher"):
        init_from_teacher(create_model("fastnet-1-32-64"), _teacher(nbase=(2, 16, 32)))


def test_cyto0_weights_make_the_teachers_twin(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    teacher = create_model("cpnet")
    teacher.load_state_dict(cyto0_state_dict)
    student = create_model("cpnet-1-32-64-128-256")
    assert init_from_teacher(student, teacher.eval()).fraction == 1.0
    x = _gray(1, 256, seed=3)
    with torch.no_grad():  # cyto_0's outputs reach ~20: its twin is equal to float32 precision, border included
        assert torch.allclose(student.eval()(x[:, :1])[0], teacher(x)[0], rtol=1e-5, atol=1e-4)


def test_the_objective_starts_the_student_from_its_teacher(tmp_path) -> None:
    from cpsam.models import save_checkpoint
    from train.config import ConfigError, load_config
    from train.model_init import build_model
    from train.objective import objective_for

    teacher_net = tiny_cpnet()
    teacher = save_checkpoint(tmp_path / "teacher.pt", teacher_net)
    base = ["objective=distill", f"kd.teacher=[{teacher}]", "model.name=cpnet", "model.nbase=[1,16,32]"]
    cfg = load_config(None, [*base, "kd.init_from_teacher=true"])
    net = build_model(cfg.model)
    note = objective_for(cfg).initialize(net)
    assert note is not None and "100.0% of the student's parameters" in note and "BatchNorms keep" in note
    conv = "downsample.down.res_down_0.conv.conv_1.2.weight"
    assert torch.equal(net.state_dict()[conv], teacher_net.state_dict()[conv])
    assert objective_for(load_config(None, base)).initialize(build_model(cfg.model)) is None  # off by default
    ensemble = load_config(None, ["objective=distill", f"kd.teacher=[{teacher},{teacher}]", "model.name=cpnet",
                                  "model.nbase=[1,16,32]", "kd.init_from_teacher=true"])
    with pytest.raises(ConfigError, match="one teacher"):
        objective_for(ensemble).initialize(build_model(ensemble.model))


def test_frozen_batchnorms_keep_the_teachers_statistics_in_training() -> None:
    from distill.teacher_init import freeze_copied_batchnorms

    teacher = _teacher()
    student = create_model("cpnet-1-32-64-128-256")
    report = init_from_teacher(student, teacher)
    frozen = freeze_copied_batchnorms(student, report)
    assert len(frozen) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    x = _gray(2, 128)
    with torch.no_grad():
        out = student.train()(x[:, :1])[0]  # train mode: still the teacher's statistics, left as they were
        error = (out - teacher(x)[0]).abs()
    assert float(error[..., 32:-32, 32:-32].max()) < 1e-5
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    # a smaller student: only the BatchNorms of the copied layers are frozen
    small = create_model("cpnet-1-32-64")
    names = freeze_copied_batchnorms(small, init_from_teacher(small, teacher))
    assert names and "upsample.up.res_up_1.conv.conv_0.0" not in names
    assert not init_from_teacher(create_model("cpnet-1-32-64"), teacher, load=False).folded  # load=False: a plan
