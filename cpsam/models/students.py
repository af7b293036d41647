"""Distillation students: the CPnet family by name, and FastNet, a family built for CPU speed.

Names registered with `cpsam.models.create_model` (../shared/research/cpsam_recipe.md section 6):

- ``cpnet-{C}-32``, ``cpnet-{C}-32-64``, ``cpnet-{C}-32-64-128``, ``cpnet-{C}-32-64-128-256`` for
  C = 1 or 2 input channels: the classic Cellpose U-Net (`cpsam.models.cpnet.CPnet`) with that
  nbase (the seed's students). A built model *is* a CPnet (`model_name` "cpnet" with its nbase), so
  checkpoints rebuild it through the "cpnet" builder and `cpsam.segment` runs it under the classic
  (cellpose 3) rules, like its cyto_0 teacher.
- ``fastnet-{C}-{w1}-...-{wL}`` (C = 1 or 2; widths below) and ``fastnet-{C}-r18``: `FastNet`.

Why FastNet: a CPnet student, however narrow its deeper levels, still runs eight full-resolution 32-channel 3x3
convolutions per tile like cyto_0, so it is only a little cheaper (benchmarks/bench_students.py; figures in
docs/results/distillation.md). FastNet keeps the CPnet interface but
- predicts at half resolution: a stride-2 stem, every convolution at H/2 or below, and the
  3-channel output bilinearly upsampled to (H, W) inside `forward` (a 1x1 head commutes with the
  upsampling, so this equals upsampling the 32-channel features first and is 10x cheaper);
- runs one residual pair of conv-BN-ReLU per encoder level and one conv per decoder level
  (CPnet: four convs per level on each side);
- uses post-activation conv-BN pairs, so `fuse()` folds every BatchNorm into its convolution for
  inference (CPnet's BN-ReLU-conv order cannot be folded);
- runs in channels-last memory layout when `channels_last=True` (oneDNN's preferred layout on CPU).
The ``r18`` variant takes its encoder from timm (`resnet18`, `features_only`, random weights: no
model hub here), whose strides 2..32 give five levels, with the same light decoder.

FastNet's outputs, as CPnet's: (output (B, 3, H, W) [dY, dX, cellprob logit], style (B, S), features
(B, 32, H/2, W/2)). The features are the 32-channel map that feeds the 1x1 output head, at half
resolution (`feature_stride` = 2): a KD feature term against cyto_0's full-resolution 32-channel
features needs no channel adapter, only a 2x resize (average-pool the teacher's map, or upsample the
student's bilinearly).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cpsam.models.cpnet import BN_EPS, BN_MOMENTUM, CPNET_TILE_SIZE, CPnet
from cpsam.models.registry import register_model

STUDENT_WIDTHS = (32, 64, 128, 256)
STUDENT_INPUT_CHANNELS = (1, 2)
FASTNET_PRESETS: dict[str, tuple[int, ...]] = {
    "32-64": (32, 64),
    "32-64-128": (32, 64, 128),
    "32-64-128-256": (32, 64, 128, 256),
    "16-32-64-128": (16, 32, 64, 128),
    "40-80-160-320": (40, 80, 160, 320),
}
FEATURE_CHANNELS = 32


def cpnet_student_names() -> list[str]:
    """Registry names of the CPnet students, e.g. 'cpnet-1-32-64'."""
    return [f"cpnet-{c}-" + "-".join(str(w) for w in STUDENT_WIDTHS[:depth])
            for c in STUDENT_INPUT_CHANNELS for depth in range(1, len(STUDENT_WIDTHS) + 1)]


def fastnet_names() -> list[str]:
    """Registry names of the FastNet students, e.g. 'fastnet-1-32-64-128-256', 'fastnet-2-r18'."""
    return [f"fastnet-{c}-{preset}" for c in STUDENT_INPUT_CHANNELS for preset in (*FASTNET_PRESETS, "r18")]


def student_names() -> list[str]:
    """Every student name registered by this module (CPnet students first)."""
    return cpnet_student_names() + fastnet_names()


# ----------------------------------------------------------------------------- building blocks


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU; `fold()` merges the BN into the conv (inference).

    Args:
        in_channels, out_channels: channels in and out.
        kernel: odd kernel size ('same' padding).
        stride: convolution stride (2 halves H and W).
        relu: apply ReLU after the BN.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H / stride, W / stride)."""
        y = self.bn(self.conv(x))
        return F.relu(y, inplace=True) if self.relu else y

    def fold(self) -> None:
        """Replace conv + BN by one conv with bias computing the same eval-mode function (in place)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        self.conv = fold_batchnorm(self.conv, self.bn)
        self.bn = nn.Identity()


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to eval-mode `bn(conv(x))`: w' = w * g / s, b' = (b - mu) g / s + beta,
    s = sqrt(running_var + eps). Computed in float64, stored in the conv's dtype and device."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        fused.bias.copy_((bias - bn.running_mean.double()) * scale + beta)
    return fused.to(device=conv.weight.device, dtype=conv.weight.dtype)


class ResPair(nn.Module):
    """Two 3x3 ConvBN with an identity (or 1x1 ConvBN projection) shortcut; ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3)
        self.conv2 = ConvBN(out_channels, out_channels, 3, relu=False)
        self.proj: nn.Module = (ConvBN(in_channels, out_channels, 1, relu=False) if in_channels != out_channels
                                else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return F.relu(self.proj(x) + self.conv2(self.conv1(x)), inplace=True)


class UpLevel(nn.Module):
    """Decoder level: 2x nearest upsampling, 1x1 ConvBN to the skip's width, + skip + Linear(style), 3x3 ConvBN."""

    def __init__(self, in_channels: int, out_channels: int, style_channels: int) -> None:
        super().__init__()
        self.reduce = ConvBN(in_channels, out_channels, 1)
        self.style = nn.Linear(style_channels, out_channels)
        self.conv = ConvBN(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (B, in, h, w), skip (B, out, H, W) with H, W = 2h, 2w (or h + 1...), style (B, S) -> (B, out, H, W)."""
        x = F.interpolate(self.reduce(x), size=(skip.shape[-2], skip.shape[-1]), mode="nearest")
        return self.conv(x + skip + self.style(style)[:, :, None, None])


class PlainEncoder(nn.Module):
    """Stride-2 stem (C -> w1), one ResPair at H/2, then per level a 2x2 max-pool and a ResPair."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, widths[0], 3, stride=2)
        self.levels = nn.ModuleList(
            [ResPair(widths[0], widths[0])] + [ResPair(widths[n - 1], widths[n]) for n in range(1, len(widths))])
        self.channels = list(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> [(B, widths[n], H / 2**(n+1), W / 2**(n+1)) for each level n]."""
        maps: list[torch.Tensor] = []
        y = self.stem(x)
        for n, level in enumerate(self.levels):
            y = level(y if n == 0 else F.max_pool2d(y, 2))
            maps.append(y)
        return maps


class TimmEncoder(nn.Module):
    """A timm ResNet18 (`features_only`, random weights): maps at strides 2, 4, 8, 16, 32 (64..512 ch)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.body = timm.create_model("resnet18", pretrained=False, features_only=True, in_chans=in_channels)
        self.channels = [int(c) for c in self.body.feature_info.channels()]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> five maps, full-resolution-first, at H / 2 ... H / 32."""
        return list(self.body(x))


# ----------------------------------------------------------------------------- FastNet


class FastNet(nn.Module):
    """Half-resolution residual U-Net with a style vector: the fast student family (module docstring).

    Args:
        in_channels: input channels (1 grayscale, 2 cytoplasm + nucleus).
        widths: channels per encoder level, full resolution first (level n runs at H / 2**(n+1));
            ignored by the "resnet18" encoder (64, 64, 128, 256, 512).
        encoder: "plain" (stem + ResPairs) or "resnet18" (timm).
        nout: output channels (3: dY, dX, cell-probability logit).
        diam_mean: mean cell diameter in pixels the net is trained at (the teacher's).
        tile_size: tile side for `cpsam.segment` (224, as CPnet).
        channels_last: keep activations in channels-last memory layout (faster on CPU with oneDNN).

    Attributes follow the cpsam model interface: `in_channels`, `tile_size`, `diam_mean`,
    `diam_labels` (non-trainable (1,) float32 parameters, as CPnet), `style_channels`,
    `feature_channels` (32), `feature_stride` (2). Any H, W work (inputs are zero-padded to a multiple
    of the deepest stride inside `forward` and the output cropped back).
    """

    model_name: str = "fastnet"

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256), encoder: str = "plain",
                 nout: int = 3, diam_mean: float = 30.0, tile_size: int = CPNET_TILE_SIZE,
                 channels_last: bool = True) -> None:
        super().__init__()
        if encoder not in ("plain", "resnet18"):
            raise ValueError(f"encoder must be 'plain' or 'resnet18', got {encoder!r}")
        widths = [int(w) for w in widths]
        if in_channels < 1 or not widths or min(widths) < 1:
            raise ValueError(f"need in_channels >= 1 and positive widths, got {in_channels} and {widths}")
        self.in_channels = int(in_channels)
        self.widths = widths
        self.encoder_kind = encoder
        self.nout = int(nout)
        self.tile_size = int(tile_size)
        self.channels_last = bool(channels_last)
        self.encoder: nn.Module = PlainEncoder(in_channels, widths) if encoder == "plain" else TimmEncoder(in_channels)
        enc = list(self.encoder.channels)
        # decoder widths: the half-resolution level has FEATURE_CHANNELS channels, deeper ones the encoder's
        dec = [FEATURE_CHANNELS, *enc[1:]]
        self.skip_proj = nn.ModuleList(
            [nn.Identity() if enc[n] == dec[n] else ConvBN(enc[n], dec[n], 1) for n in range(len(enc) - 1)])
        if len(enc) == 1:
            self.skip_proj.append(nn.Identity() if enc[0] == dec[0] else ConvBN(enc[0], dec[0], 1))
        self.up = nn.ModuleList([UpLevel(dec[n + 1], dec[n], enc[-1]) for n in range(len(enc) - 1)])
        self.head = nn.Conv2d(FEATURE_CHANNELS, nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.stride = 2 ** len(enc)

    @property
    def style_channels(self) -> int:
        """Length of the style vector (the deepest encoder width)."""
        return int(self.encoder.channels[-1])

    @property
    def feature_channels(self) -> int:
        """Channels of the feature map feeding the output head (32)."""
        return FEATURE_CHANNELS

    @property
    def feature_stride(self) -> int:
        """The features are at 1 / feature_stride of the input resolution (2)."""
        return 2

    def model_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild this architecture (`create_model("fastnet", **kwargs)`)."""
        return {"in_channels": self.in_channels, "widths": list(self.widths), "encoder": self.encoder_kind,
                "nout": self.nout, "tile_size": self.tile_size, "channels_last": self.channels_last}

    def fuse(self) -> FastNet:
        """A copy for inference with every BatchNorm folded into its conv (eval mode, same outputs to ~1e-6).

        The copy cannot be trained or saved with `save_checkpoint` (its state_dict has no BN tensors):
        keep the original for that. A timm encoder's conv/bn pairs are folded too.
        """
        fused = copy.deepcopy(self).eval()
        for module in fused.modules():
            if isinstance(module, ConvBN):
                module.fold()
        if self.encoder_kind == "resnet18":
            _fold_timm_resnet(fused.encoder.body)
        return fused

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the net.

        Args:
            x: (B, in_channels, H, W) float, any H, W >= 1.

        Returns:
            output (B, nout, H, W): [dY, dX, cell-probability logit], flows at 5x unit length;
            style (B, style_channels): the L2-normalized global average of the deepest encoder map;
            features (B, 32, ceil(H / 2), ceil(W / 2)) of the padded input: the map the 1x1 head reads.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FastNet needs input (B, {self.in_channels}, H, W), got {list(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.encoder(x)
        style = F.normalize(maps[-1].mean(dim=(2, 3)), dim=1)
        if len(self.up) == 0:
            features = self.skip_proj[0](maps[0])
        else:
            y = maps[-1]
            for k, level in enumerate(self.up[::-1]):
                n = len(self.up) - 1 - k
                y = level(y, self.skip_proj[n](maps[n]), style)
            features = y
        # the 1x1 head commutes with bilinear upsampling: upsample 3 channels, not 32
        out = F.interpolate(self.head(features), size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        out = out[:, :, :h, :w].contiguous()
        return out, style, features


def _fold_timm_resnet(body: nn.Module) -> None:
    """Fold conv/bn pairs of a timm ResNet in place (stem conv1/bn1, blocks convK/bnK, downsample 0/1)."""
    for module in list(body.modules()):
        for k in ("", "1", "2", "3"):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, f"conv{k}", fold_batchnorm(conv, bn))
                setattr(module, f"bn{k}", nn.Identity())
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
                and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fold_batchnorm(module[0], module[1])
            module[1] = nn.Identity()


# ----------------------------------------------------------------------------- registry


def _build_cpnet_student(nbase: tuple[int, ...], nout: int = 3, kernel: int = 3, diam_mean: float = 30.0) -> CPnet:
    """A randomly initialized CPnet student with channels `nbase` (model_name stays "cpnet")."""
    return CPnet(nbase, nout=nout, kernel=kernel, diam_mean=diam_mean)


def _build_fastnet(in_channels: int, widths: tuple[int, ...], encoder: str, **kwargs: object) -> FastNet:
    return FastNet(in_channels=in_channels, widths=widths, encoder=encoder, **kwargs)  # type: ignore[arg-type]


@register_model("fastnet")
def build_fastnet(**kwargs: object) -> FastNet:
    """`create_model("fastnet", in_channels=..., widths=[...], encoder=...)`: a randomly initialized FastNet."""
    return FastNet(**kwargs)  # type: ignore[arg-type]


for _c in STUDENT_INPUT_CHANNELS:
    for _depth in range(1, len(STUDENT_WIDTHS) + 1):
        _nbase = (_c, *STUDENT_WIDTHS[:_depth])
        register_model("cpnet-" + "-".join(str(v) for v in _nbase))(functools.partial(_build_cpnet_student, _nbase))
    for _preset, _widths in FASTNET_PRESETS.items():
        register_model(f"fastnet-{_c}-{_preset}")(functools.partial(_build_fastnet, _c, _widths, "plain"))
    register_model(f"fastnet-{_c}-r18")(functools.partial(_build_fastnet, _c, (64, 64, 128, 256, 512), "resnet18"))
