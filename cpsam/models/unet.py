"""The binary-segmentation family: ResNet U-Nets with pixel-shuffle (ICNR) upsampling, like fastai's DynamicUnet.

    net = create_model("resnet34_unet", in_chans=1, num_classes=2)
    logits = net(x)[0]                     # x (B, 1, H, W) -> (B, 2, H, W) class logits at input resolution

Layout (fastai v2 `DynamicUnet`, ../shared/research/training_anchors.md section 6), with a timm encoder
(`features_only`, strides 2/4/8/16/32) instead of a cut torchvision model:

    encoder -> BatchNorm -> ReLU -> middle conv (ni -> 2 ni -> ni)
    -> one UnetBlock per skip, deepest first (skips at strides 16, 8, 4, 2):
       PixelShuffle_ICNR(up_in -> up_in / 2), BatchNorm on the skip, concat, ReLU, conv, conv
    -> PixelShuffle_ICNR (stride 2 -> 1) -> resize to the input size
    -> last cross: concat the raw input, a residual block of two 3x3 convs -> 1x1 conv to num_classes.

Decoder convolutions have no normalization (DynamicUnet's norm_type=None): conv (bias) + ReLU, kaiming-normal
weights and zero biases. ResNet34 widths give blocks of 512, 384, 256 and 96 channels. `decoder_div` divides
every decoder width (middle conv, block outputs) by an integer: the small students (`resnet10t_unet` halves
them) spend far less on the full-resolution layers, which dominate the cost of the fastai layout.

ImageNet weights: the timm hub is not reachable here, so `load_encoder_weights(net, FILE)` takes a local
timm or torchvision ResNet file and adapts the first convolution to `in_chans` as fastai does (1 channel: sum
of the RGB kernels; 2: the first two x 1.5; more than 3: RGB copied, the rest zero).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cpsam.models.loading import read_checkpoint
from cpsam.models.registry import register_model

UNET_TILE_SIZE = 256
ENCODERS = {"resnet34_unet": "resnet34", "resnet18_unet": "resnet18", "resnet10t_unet": "resnet10t"}
DEFAULT_DECODER_DIV = {"resnet34_unet": 1, "resnet18_unet": 1, "resnet10t_unet": 2}


def icnr_(weight: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """ICNR initialisation in place (arXiv 1707.02937, fastai `icnr_init`) of a conv weight (nf * scale^2, ni, k, k).

    A kaiming-normal kernel with nf output channels is drawn and each output channel is repeated scale^2 times
    in a row, so after PixelShuffle(scale) every scale x scale output window starts identical. Returns `weight`.
    """
    out_channels = weight.shape[0]
    if out_channels % (scale * scale):
        raise ValueError(f"ICNR needs output channels divisible by {scale * scale}, got {out_channels}")
    base = torch.empty(out_channels // (scale * scale), *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_normal_(base)
    with torch.no_grad():
        weight.copy_(base.repeat_interleave(scale * scale, dim=0))
    return weight


def conv_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    """fastai `ConvLayer(norm_type=None)`: Conv2d ('same' padding, bias) -> ReLU; kaiming-normal weight, zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    nn.init.kaiming_normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU(inplace=True)))


class PixelShuffleICNR(nn.Sequential):
    """fastai v2 `PixelShuffle_ICNR(ni, nf, scale, blur)` without weight norm (as inside DynamicUnet).

    1x1 conv ni -> nf * scale^2 (ICNR weight, zero bias) -> ReLU -> PixelShuffle(scale); with `blur`,
    ReplicationPad2d((1, 0, 1, 0)) + AvgPool2d(2, stride=1) after it (arXiv 1806.02658). Maps (B, ni, H, W) to
    (B, nf, scale H, scale W). fastai v1 always blurred (a module is truthy); here blur is applied only when asked.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, scale: int = 2, blur: bool = False) -> None:
        out_channels = in_channels if out_channels is None else out_channels
        conv = nn.Conv2d(in_channels, out_channels * scale * scale, 1)
        icnr_(conv.weight, scale)
        nn.init.zeros_(conv.bias)
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv, act=nn.ReLU(inplace=True),
                                                          shuffle=nn.PixelShuffle(scale))
        if blur:
            layers["pad"] = nn.ReplicationPad2d((1, 0, 1, 0))
            layers["blur"] = nn.AvgPool2d(2, stride=1)
        super().__init__(layers)


class UnetBlock(nn.Module):
    """One decoder step (fastai `UnetBlock`): upsample the deeper map by pixel shuffle, join the skip, two convs.

    Args:
        up_channels: channels of the deeper input; it is upsampled to up_channels // 2.
        skip_channels: channels of the encoder skip at the target resolution (BatchNorm-ed before the concat).
        out_channels: channels produced by the two 3x3 convs.
        blur: blur after the pixel shuffle.
    """

    def __init__(self, up_channels: int, skip_channels: int, out_channels: int, blur: bool = False) -> None:
        super().__init__()
        self.shuf = PixelShuffleICNR(up_channels, up_channels // 2, blur=blur)
        self.bn = nn.BatchNorm2d(skip_channels)
        self.relu = nn.ReLU()
        self.conv1 = conv_relu(up_channels // 2 + skip_channels, out_channels)
        self.conv2 = conv_relu(out_channels, out_channels)

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """up (B, up_channels, h, w), skip (B, skip_channels, ~2h, ~2w) -> (B, out_channels, skip H, skip W)."""
        up = self.shuf(up)
        if up.shape[-2:] != skip.shape[-2:]:  # odd sizes: fastai resizes the upsampled map to the skip (nearest)
            up = F.interpolate(up, size=skip.shape[-2:], mode="nearest")
        return self.conv2(self.conv1(self.relu(torch.cat([up, self.bn(skip)], dim=1))))


class ResBlock(nn.Module):
    """fastai `ResBlock(1, ni, ni, norm_type=None)`: ReLU(conv3x3-ReLU-conv3x3(x) + x), kaiming-normal, zero bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.kaiming_normal_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.act(self.conv2(self.conv1(x)) + x)


class ResNetUNet(nn.Module):
    """A ResNet-encoder U-Net for per-pixel classes (cell / background), fastai DynamicUnet layout.

    Args:
        encoder: timm model name of the encoder (resnet34, resnet18, resnet10t, ...; random weights).
        in_chans: input channels C.
        num_classes: output classes K (2: background, cell).
        blur: blur after every pixel shuffle but the last (fastai `blur`).
        blur_final: also blur after the last block's shuffle when `blur` (fastai `blur_final`).
        last_cross: concat the raw input before the final residual block (fastai `last_cross`).
        decoder_div: integer divisor of every decoder width (1 = fastai's widths).
        tile_size: training / inference tile in pixels (the loop reads `tile_size`).
        model_name: the registry name this architecture is rebuilt under (checkpoints).

    Attributes read by the training loop and checkpoints: `in_channels`, `num_classes`, `tile_size`,
    `model_name`, `model_kwargs()`.
    """

    def __init__(self, encoder: str = "resnet34", in_chans: int = 3, num_classes: int = 2, blur: bool = False,
                 blur_final: bool = True, last_cross: bool = True, decoder_div: int = 1,
                 tile_size: int = UNET_TILE_SIZE, model_name: str = "resnet34_unet") -> None:
        super().__init__()
        if in_chans < 1 or num_classes < 1 or decoder_div < 1 or tile_size < 32:
            raise ValueError(f"in_chans, num_classes, decoder_div must be >= 1 and tile_size >= 32; got {in_chans}, "
                             f"{num_classes}, {decoder_div}, {tile_size}")
        self.model_name = model_name
        self.encoder_name = encoder
        self.in_channels = int(in_chans)
        self.num_classes = int(num_classes)
        self.blur, self.blur_final, self.last_cross = bool(blur), bool(blur_final), bool(last_cross)
        self.decoder_div = int(decoder_div)
        self.tile_size = int(tile_size)
        self.encoder = timm.create_model(encoder, pretrained=False, features_only=True, in_chans=in_chans)
        widths = list(self.encoder.feature_info.channels())
        if list(self.encoder.feature_info.reduction()) != [2, 4, 8, 16, 32]:
            raise ValueError(f"encoder {encoder} must give features at strides 2-32, got "
                             f"{self.encoder.feature_info.reduction()}")
        bottom = widths[-1]
        d = self.decoder_div
        self.bottom_norm = nn.Sequential(nn.BatchNorm2d(bottom), nn.ReLU())
        self.middle = nn.Sequential(conv_relu(bottom, 2 * bottom // d), conv_relu(2 * bottom // d, bottom // d))
        blocks, up = [], bottom // d
        skips = widths[-2::-1]  # strides 16, 8, 4, 2
        for i, skip in enumerate(skips):
            final = i == len(skips) - 1
            joined = up // 2 + skip
            out = max(1, (joined // 2 if final else joined) // d)
            blocks.append(UnetBlock(up, skip, out, blur=self.blur and (not final or self.blur_final)))
            up = out
        self.blocks = nn.ModuleList(blocks)
        self.final_shuffle = PixelShuffleICNR(up)  # stride 2 -> 1 (fastai: no blur on this one)
        head_in = up + (self.in_channels if self.last_cross else 0)
        self.cross = ResBlock(head_in) if self.last_cross else nn.Identity()
        self.head = nn.Conv2d(head_in, self.num_classes, 1)  # PyTorch's default init (fastai: ConvLayer default)

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture: `create_model(self.model_name, **kwargs)`."""
        return {"in_chans": self.in_channels, "num_classes": self.num_classes, "blur": self.blur,
                "blur_final": self.blur_final, "last_cross": self.last_cross, "decoder_div": self.decoder_div,
                "tile_size": self.tile_size}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """x (B, in_chans, H, W) float (any H, W; multiples of 32 avoid resizing) -> (logits (B, K, H, W),)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.model_name} needs input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        features = self.encoder(x)
        y = self.middle(self.bottom_norm(features[-1]))
        for block, skip in zip(self.blocks, features[-2::-1], strict=True):
            y = block(y, skip)
        y = self.final_shuffle(y)
        if y.shape[-2:] != x.shape[-2:]:  # fastai ResizeToOrig
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        if self.last_cross:
            y = self.cross(torch.cat([y, x], dim=1))
        return (self.head(y),)


def _builder(name: str):
    def build(in_chans: int = 3, num_classes: int = 2, blur: bool = False, blur_final: bool = True,
              last_cross: bool = True, decoder_div: int | None = None, tile_size: int = UNET_TILE_SIZE,
              encoder_weights: str | os.PathLike[str] | None = None) -> ResNetUNet:
        net = ResNetUNet(ENCODERS[name], in_chans, num_classes, blur, blur_final, last_cross,
                         DEFAULT_DECODER_DIV[name] if decoder_div is None else decoder_div, tile_size, name)
        if encoder_weights:
            load_encoder_weights(net, encoder_weights)
        return net

    build.__name__ = f"build_{name}"
    build.__doc__ = (f"`create_model('{name}', in_chans=C, num_classes=K)`: a {ENCODERS[name]} U-Net, random weights "
                     "unless `encoder_weights` names a local ImageNet timm/torchvision file.")
    return build


for _name in ENCODERS:
    register_model(_name)(_builder(_name))


# ----------------------------------------------------------------------------- ImageNet encoder weights


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """fastai's first-layer adaptation of an RGB kernel (O, 3, k, k) to `in_chans` inputs: 1 -> sum over RGB,
    2 -> the first two x 1.5, 3 -> unchanged, more -> RGB then zeros. Returns (O, in_chans, k, k) float32."""
    weight = weight.float()
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if in_chans == 2:
        return weight[:, :2] * 1.5
    out = weight.new_zeros(weight.shape[0], in_chans, *weight.shape[2:])
    out[:, :3] = weight[:, :3]
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: timm's dependency, needed for .safetensors files only

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - any decoder error is one message
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    obj = read_checkpoint(path)
    for key in ("state_dict", "model"):  # timm train checkpoints wrap the weights
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a ResNet state_dict, found an object of type {type(obj).__name__}")
    return dict(obj)


def load_encoder_weights(net: ResNetUNet, path: str | os.PathLike[str]) -> list[str]:
    """Load a local ImageNet ResNet file (timm or torchvision keys; .pth/.pt/.bin/.safetensors) into `net.encoder`.

    `module.` / `model.` prefixes and the classifier (`fc.*`) are dropped; the first convolution is adapted to the
    net's input channels (`adapt_first_conv`). Raises ValueError naming the file when its tensors do not match the
    encoder (another architecture, missing or mis-shaped tensors). Returns the names of the tensors loaded.
    """
    p = Path(path)
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in _read_weights(p).items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    wanted = net.encoder.state_dict()
    first = next(k for k, v in wanted.items() if v.ndim == 4)  # the stem's first conv (conv1 / conv1.0)
    if first in state and state[first].ndim == 4 and state[first].shape[1] != net.in_channels:
        state[first] = adapt_first_conv(state[first], net.in_channels)
    missing = sorted(k for k in set(wanted) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(wanted))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} encoder tensors missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] if unexpected else []
        parts += [f"shapes differ: {'; '.join(bad[:3])}"] if bad else []
        raise ValueError(f"{p}: not ImageNet weights of {net.encoder_name}: " + "; ".join(parts))
    net.encoder.load_state_dict({**wanted, **{k: v.to(wanted[k].dtype) for k, v in state.items()}}, strict=True)
    return sorted(state)


def count_parameters(net: nn.Module, parts: Sequence[str] | None = None) -> int:
    """Number of trainable parameters of `net` (or of its named child modules `parts`)."""
    modules = [net] if parts is None else [getattr(net, p) for p in parts]
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
