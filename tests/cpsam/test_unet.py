"""The binary family's U-Nets: PixelShuffle_ICNR at initialisation, the stated parameter count of resnet34_unet
(checked against the widths fastai's DynamicUnet derives), shapes, checkpoints, and ImageNet weight files."""

from __future__ import annotations

import pytest
import timm
import torch

from cpsam.models import create_model, list_models, load_model, save_checkpoint
from cpsam.models.unet import PixelShuffleICNR, adapt_first_conv, count_parameters, icnr_, load_encoder_weights

# resnet34_unet(in_chans=3, num_classes=2): 21,284,672 encoder + 19,936,496 decoder parameters (fastai's
# unet_learner(resnet34) is the same 41.2 M for 3 channels and 2 classes)
RESNET34_UNET_PARAMS = 41_221_168


def test_registered() -> None:
    assert {"resnet34_unet", "resnet18_unet", "resnet10t_unet"} <= set(list_models())


@pytest.mark.parametrize("scale", [2, 3])
def test_pixel_shuffle_icnr_windows_identical_at_init(scale: int) -> None:
    """fastai's own property: after ICNR init, every scale x scale output window holds one value per channel."""
    torch.manual_seed(0)
    layer = PixelShuffleICNR(16, 8, scale=scale)
    y = layer(torch.randn(2, 16, 7, 5))
    assert y.shape == (2, 8, 7 * scale, 5 * scale)
    first = y[:, :, 0::scale, 0::scale]
    for i in range(scale):
        for j in range(scale):
            assert torch.equal(y[:, :, i::scale, j::scale], first)
    assert first.std() > 0.1  # not trivially constant


def test_pixel_shuffle_icnr_blur_only_when_asked() -> None:
    """fastai v1 always blurred (a module is truthy); ours blurs only with blur=True (and keeps the size)."""
    plain, blurred = PixelShuffleICNR(8, 4), PixelShuffleICNR(8, 4, blur=True)
    assert not any(isinstance(m, torch.nn.AvgPool2d) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in blurred.modules()) == 1
    blurred.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 6, 6)
    a, b = plain(x), blurred(x)
    assert a.shape == b.shape == (1, 4, 12, 12)
    # the blur is the mean of each pixel and its top / left neighbours (replication padded)
    padded = torch.nn.functional.pad(a, (1, 0, 1, 0), mode="replicate")
    expected = (padded[..., 1:, 1:] + padded[..., :-1, 1:] + padded[..., 1:, :-1] + padded[..., :-1, :-1]) / 4
    torch.testing.assert_close(b, expected)


def test_icnr_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        icnr_(torch.empty(6, 3, 1, 1))


def _decoder_params(widths: list[int], n_in: int, n_out: int) -> int:
    """DynamicUnet's decoder parameter count from the encoder widths (strides 2..32), written out by hand."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731 - conv with bias
    ni = widths[-1]
    total = 2 * ni + conv(ni, 2 * ni, 3) + conv(2 * ni, ni, 3)  # BatchNorm + middle conv
    up = ni
    for k, skip in enumerate(widths[-2::-1]):
        joined = up // 2 + skip
        out = joined if k < 3 else joined // 2
        total += conv(up, up // 2 * 4, 1) + 2 * skip + conv(joined, out, 3) + conv(out, out, 3)
        up = out
    total += conv(up, up * 4, 1)  # final PixelShuffle_ICNR
    cross = up + n_in
    return total + 2 * conv(cross, cross, 3) + conv(cross, n_out, 1)


def test_resnet34_unet_parameter_count() -> None:
    net = create_model("resnet34_unet", in_chans=3, num_classes=2)
    encoder = timm.create_model("resnet34", pretrained=False)
    encoder_params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("fc."))
    assert count_parameters(net, ["encoder"]) == encoder_params == 21_284_672
    assert count_parameters(net) - encoder_params == _decoder_params([64, 64, 128, 256, 512], 3, 2)
    assert count_parameters(net) == RESNET34_UNET_PARAMS
    assert [b.conv2.conv.out_channels for b in net.blocks] == [512, 384, 256, 96]  # fastai's derived widths


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 100, 72)])
def test_forward_any_size(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = create_model("resnet10t_unet", in_chans=1, num_classes=2).eval()
    with torch.no_grad():
        out = net(torch.randn(*shape))
    assert isinstance(out, tuple) and out[0].shape == (shape[0], 2, *shape[2:])
    assert net.in_channels == 1 and net.tile_size == 256
    with pytest.raises(ValueError, match="needs input"):
        net(torch.randn(1, 3, 64, 64))


def test_student_is_much_smaller() -> None:
    small = count_parameters(create_model("resnet10t_unet", in_chans=3))
    assert small < 0.3 * RESNET34_UNET_PARAMS
    assert create_model("resnet10t_unet").decoder_div == 2


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    net = create_model("resnet10t_unet", in_chans=2, num_classes=2, decoder_div=4, blur=True).eval()
    save_checkpoint(tmp_path / "m.pt", net)
    back = load_model(tmp_path / "m.pt")
    assert back.model_name == "resnet10t_unet" and back.model_kwargs() == net.model_kwargs()
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x)[0], net(x)[0])


def test_first_layer_adaptation_rules() -> None:
    """fastai's `_load_pretrained_weights`: 1 -> sum of RGB, 2 -> first two x 1.5, 3 -> as is, 5 -> RGB + zeros."""
    rgb = torch.randn(4, 3, 3, 3)
    assert torch.equal(adapt_first_conv(rgb, 1), rgb.sum(1, keepdim=True))
    assert torch.equal(adapt_first_conv(rgb, 2), rgb[:, :2] * 1.5)
    assert torch.equal(adapt_first_conv(rgb, 3), rgb)
    five = adapt_first_conv(rgb, 5)
    assert torch.equal(five[:, :3], rgb) and not five[:, 3:].any()


@pytest.mark.parametrize("in_chans", [1, 4])
def test_imagenet_file_first_layer_adapted(tmp_path, in_chans: int) -> None:
    """A torchvision-style resnet18 file (with fc) loads into the encoder; conv1 adapted as fastai does."""
    torch.manual_seed(2)
    source = timm.create_model("resnet18", pretrained=False)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DataParallel-saved file
    torch.save(state, tmp_path / "resnet18.pth")
    net = create_model("resnet18_unet", in_chans=in_chans)
    loaded = load_encoder_weights(net, tmp_path / "resnet18.pth")
    assert "conv1.weight" in loaded and not any(k.startswith("fc.") for k in loaded)
    rgb = source.conv1.weight.detach()
    got = net.encoder.conv1.weight.detach()
    expected = {1: rgb.sum(1, keepdim=True), 2: rgb[:, :2] * 1.5, 3: rgb}.get(in_chans)
    if expected is None:
        expected = torch.cat([rgb, torch.zeros(64, in_chans - 3, 7, 7)], dim=1)
    assert torch.equal(got, expected) and torch.equal(adapt_first_conv(rgb, in_chans), expected)
    assert torch.equal(net.encoder.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(net.encoder.bn1.running_var, source.bn1.running_var)


def test_imagenet_file_of_another_architecture_is_refused(tmp_path) -> None:
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    net = create_model("resnet34_unet", in_chans=3)
    with pytest.raises(ValueError, match=r"r18\.pth: not ImageNet weights of resnet34"):
        load_encoder_weights(net, tmp_path / "r18.pth")
    (tmp_path / "bad.pth").write_text("not weights")
    with pytest.raises(ValueError, match="bad.pth"):
        load_encoder_weights(net, tmp_path / "bad.pth")
