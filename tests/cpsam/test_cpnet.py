"""CPnet: Cellpose 3 state_dict layout, equivalence with cellpose 3.1.1.2, the student family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path

from cpsam.models import CPnet, cpnet_from_state_dict, create_model
from cpsam.models.cpnet import infer_cpnet_config

CYTO_NBASE = [2, 32, 64, 128, 256]
STUDENTS = [[1, 32], [1, 32, 64], [2, 32, 64], [2, 32, 64, 128]]


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_state_dict_layout_is_cellpose3() -> None:
    """Every key, shape and dtype (in order) equals the classic cyto file's key listing."""
    listing = shared_path("weights", "cyto_0_cpnet_torch.keys.txt").read_text().splitlines()
    expected = []
    for line in listing:
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d)
        expected.append((key, dims, dtype))
    sd = CPnet(CYTO_NBASE).state_dict()
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    assert ours == expected
    assert len(ours) == 313


def test_golden_net_io_matches_cellpose3(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    """Output and style equal cellpose 3.1.1.2's CPnet with cyto_0 to a relative 1e-5."""
    golden = np.load(shared_path("golden", "cellpose3_cyto0", "net_io.npz"))
    net = cpnet_from_state_dict(cyto0_state_dict).eval()
    assert net.nbase == CYTO_NBASE and float(net.diam_mean) == 27.0 and float(net.diam_labels) == 27.0
    with torch.no_grad():
        out, style, features = net(torch.from_numpy(golden["x"]))
        refeed = net.output(features)
    assert out.shape == (2, 3, 224, 224) and style.shape == (2, 256) and features.shape == (2, 32, 224, 224)
    assert _rel_err(out.numpy(), golden["y"]) < 1e-5
    assert _rel_err(style.numpy(), golden["style"]) < 1e-5
    # the features are exactly the tensor the output block consumes
    torch.testing.assert_close(refeed, out, rtol=0, atol=0)
    # the golden output is far from trivial (flows at 5x unit length)
    assert np.abs(golden["y"]).max() > 5


# Trainable parameter counts from cpsam_recipe.md section 4.1 (verified on cellpose 3's CPnet).
# Counts for nbase[0] = 2 students follow from the [1, ...] ones: a second input channel adds
# 2 (BN) + 32*9 (3x3 conv) + 2 (proj BN) + 32 (1x1 proj) = 324 parameters, the recipe's
# 6,600,843 - 6,600,519 difference for the full net.
PARAM_COUNTS = {
    (2, 32, 64, 128, 256): 6_600_843,
    (1, 32): 70_023,
    (1, 32, 64): 380_359,
    (1, 32, 64, 128): 1_623_623,
    (1, 32, 64, 128, 256): 6_600_519,
    (2, 32): 70_023 + 324,
    (2, 32, 64): 380_359 + 324,
    (2, 32, 64, 128): 1_623_623 + 324,
}


@pytest.mark.parametrize("nbase", sorted(PARAM_COUNTS))
def test_parameter_counts_match_recipe(nbase: tuple[int, ...]) -> None:
    net = create_model("cpnet", nbase=list(nbase))
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == PARAM_COUNTS[nbase]


@pytest.mark.parametrize("nbase", STUDENTS)
def test_student_forward_backward(nbase: list[int]) -> None:
    torch.manual_seed(0)
    net = create_model("cpnet", nbase=nbase)
    assert isinstance(net, CPnet)
    assert net.in_channels == nbase[0] and net.tile_size == 224
    for p in (net.diam_mean, net.diam_labels):
        assert isinstance(p, torch.nn.Parameter) and not p.requires_grad and p.shape == (1,)
    x = torch.randn(2, nbase[0], 32, 24)
    out, style, features = net(x)
    assert out.shape == (2, 3, 32, 24)
    assert style.shape == (2, nbase[-1])
    assert features.shape == (2, 32, 32, 24)
    torch.testing.assert_close(style.norm(dim=1), torch.ones(2))
    (out.square().mean() + features.mean()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.downsample.down.res_down_0.conv.conv_0[2].weight.grad.abs().sum() > 0


def test_batchnorm_follows_cellpose3() -> None:
    bns = [m for m in CPnet([1, 32, 64]).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4 * 5 + 1  # 2 encoder + 2 decoder levels of 5, plus the output block
    assert all(m.momentum == 0.05 and m.eps == 1e-5 for m in bns)


def test_eval_mode_is_deterministic_and_batch_independent(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    """In eval mode each image's output depends on that image only (BatchNorm uses running stats)."""
    net = cpnet_from_state_dict(cyto0_state_dict).eval()
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = net(x)[0]
        single = net(x[1:2])[0]
    torch.testing.assert_close(batch[1:2], single, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("nbase", [*STUDENTS, CYTO_NBASE])
def test_from_state_dict_round_trip(nbase: list[int]) -> None:
    torch.manual_seed(0)
    net = CPnet(nbase, diam_mean=17.0).eval()
    with torch.no_grad():
        net.diam_labels.fill_(21.5)
        for m in net.modules():  # non-trivial running statistics, so buffers matter
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    sd = net.state_dict()
    assert infer_cpnet_config(sd) == {"nbase": nbase, "nout": 3, "kernel": 3}
    again = cpnet_from_state_dict(sd).eval()
    assert again.model_kwargs() == net.model_kwargs()
    assert float(again.diam_mean) == 17.0 and float(again.diam_labels) == 21.5
    x = torch.randn(1, nbase[0], 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], net(x)[0], rtol=0, atol=0)


def test_from_state_dict_other_kernel_and_nout() -> None:
    sd = CPnet([1, 16, 24], nout=4, kernel=5).state_dict()
    net = cpnet_from_state_dict(sd)
    assert (net.nbase, net.nout, net.kernel) == ([1, 16, 24], 4, 5)


def test_from_state_dict_fills_only_optional_keys(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    """Files without diameters or BN counters (cellpose 1, MXNet conversions) load with defaults."""
    sd = {k: v for k, v in cyto0_state_dict.items() if "num_batches_tracked" not in k and "diam" not in k}
    net = cpnet_from_state_dict(sd)
    assert float(net.diam_mean) == 30.0 and float(net.diam_labels) == 30.0
    only_mean = dict(sd, diam_mean=torch.tensor([17.0]))
    net = cpnet_from_state_dict(only_mean)
    assert float(net.diam_mean) == 17.0 and float(net.diam_labels) == 17.0


def test_from_state_dict_rejects_non_cpnet(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    vit_like = {"encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 8, 8), "out.weight": torch.zeros(9)}
    with pytest.raises(ValueError, match=r"not a classic Cellpose \(CPnet\) state_dict: missing .*down_0"):
        cpnet_from_state_dict(vit_like)

    extra = dict(cyto0_state_dict, **{"encoder.size_embed": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected: encoder\.size_embed"):
        cpnet_from_state_dict(extra)

    missing = dict(cyto0_state_dict)
    del missing["upsample.up.res_up_2.conv.conv_3.full.bias"]
    with pytest.raises(ValueError, match=r"missing: upsample\.up\.res_up_2\.conv\.conv_3\.full\.bias"):
        cpnet_from_state_dict(missing)

    bad_shape = dict(cyto0_state_dict)
    bad_shape["output.0.weight"] = torch.zeros(31)
    with pytest.raises(ValueError, match=r"wrong shape: output\.0\.weight \(31,\) != \(32,\)"):
        cpnet_from_state_dict(bad_shape)


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError, match="nbase"):
        CPnet([2])
    with pytest.raises(ValueError, match="kernel"):
        CPnet([2, 32], kernel=4)
    with pytest.raises(ValueError, match=r"H and W divisible by 8, got \(1, 2, 224, 220\)"):
        CPnet(CYTO_NBASE)(torch.zeros(1, 2, 224, 220))
    with pytest.raises(ValueError, match=r"needs input \(B, 1, H, W\)"):
        CPnet([1, 32])(torch.zeros(1, 2, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(cyto0_state_dict: dict[str, torch.Tensor]) -> None:
    golden = np.load(shared_path("golden", "cellpose3_cyto0", "net_io.npz"))
    torch.backends.cudnn.allow_tf32 = False
    net = cpnet_from_state_dict(cyto0_state_dict).eval().cuda()
    with torch.no_grad():
        out, style, _ = net(torch.from_numpy(golden["x"]).cuda())
    assert _rel_err(out.cpu().numpy(), golden["y"]) < 1e-5
    assert _rel_err(style.cpu().numpy(), golden["style"]) < 1e-5
