"""Classic Cellpose network (v1-v3): a residual U-Net with a style vector and additive skips.

`CPnet(nbase)` reproduces the architecture of cellpose 3 (`resnet_torch.CPnet`) with the same
state_dict keys, so classic Cellpose files (`cyto3`, `nuclei`, the 2020 `cyto_0`, ...) load strictly.
The same class with a smaller `nbase` ([1, 32], [1, 32, 64], [2, 32, 64, 128], ...) is the student
family of the distillation study (../shared/research/cpsam_recipe.md sections 4 and 6).

Shapes for `nbase = [C, b1, ..., bL]` (L levels, L = len(nbase) - 1):
- encoder level n (module `downsample.down.res_down_{n}`) maps nbase[n] -> nbase[n+1] channels at
  resolution H / 2**n (a 2x2 max-pool precedes every level but the first);
- style = global average of the deepest map, L2-normalized: (B, nbase[-1]);
- decoder level n (`upsample.up.res_up_{n}`) maps up[n+1] -> up[n] channels with
  up = [b1, ..., bL, bL]; the deepest level runs on the deepest map with that map as its skip, the
  others follow a nearest 2x upsampling and add the encoder map of the same level;
- output block (`output`): BN -> ReLU -> 1x1 conv from b1 channels to `nout`.

Spatial sizes must be divisible by 2**(L-1) (cellpose pads to multiples of 16).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cpsam.models.registry import register_model

BN_MOMENTUM = 0.05  # cellpose 3 trains with momentum 0.05 (torch default is 0.1)
BN_EPS = 1e-5
CPNET_TILE_SIZE = 224
CYTO_NBASE = (2, 32, 64, 128, 256)


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def bn_relu_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """BatchNorm -> ReLU -> Conv(kernel, 'same' padding); keys `0.*` (BN) and `2.*` (conv)."""
    return nn.Sequential(
        _batchnorm(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
    )


def bn_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """BatchNorm -> Conv without activation (the projection shortcut); keys `0.*` and `1.*`."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    return nn.Sequential(_batchnorm(in_channels), conv)


class StyleConv(nn.Module):
    """Conv block conditioned on the style: x (+ skip) + Linear(style) per channel, then BN-ReLU-conv.

    Args:
        in_channels: channels of `x` (and of the optional skip).
        out_channels: channels produced.
        style_channels: length of the style vector.
        kernel: convolution kernel size (odd).
    """

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = bn_relu_conv(in_channels, out_channels, kernel)
        self.full = nn.Linear(style_channels, in_channels)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """style (B, S), x and skip (B, in, H, W) -> (B, out, H, W)."""
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class ResDown(nn.Module):
    """Encoder level: two residual pairs of BN-ReLU-conv, the first with a 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        for t in range(4):
            block_in = in_channels if t == 0 else out_channels
            self.conv.add_module(f"conv_{t}", bn_relu_conv(block_in, out_channels, kernel))
        self.proj = bn_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        c = self.conv
        x = self.proj(x) + c.conv_1(c.conv_0(x))
        return x + c.conv_3(c.conv_2(x))


class ResUp(nn.Module):
    """Decoder level: like ResDown, but three of the four convs see the style and the first the skip."""

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", bn_relu_conv(in_channels, out_channels, kernel))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", StyleConv(out_channels, out_channels, style_channels, kernel))
        self.proj = bn_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W), skip (B, out, H, W), style (B, S) -> (B, out, H, W)."""
        c = self.conv
        x = self.proj(x) + c.conv_1(style, c.conv_0(x), skip)
        return x + c.conv_3(style, c.conv_2(style, x))


class Encoder(nn.Module):
    """`downsample`: the ResDown levels; returns every level's output (full resolution first)."""

    def __init__(self, nbase: Sequence[int], kernel: int) -> None:
        super().__init__()
        self.down = nn.Sequential()
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", ResDown(nbase[n], nbase[n + 1], kernel))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, nbase[0], H, W) -> [(B, nbase[n+1], H / 2**n, W / 2**n) for each level n]."""
        maps: list[torch.Tensor] = []
        for n, level in enumerate(self.down):
            maps.append(level(x if n == 0 else F.max_pool2d(maps[-1], 2)))
        return maps


class Decoder(nn.Module):
    """`upsample`: ResUp levels from the deepest map back to full resolution, skips added."""

    def __init__(self, nbase: Sequence[int], kernel: int) -> None:
        super().__init__()
        up = [*nbase[1:], nbase[-1]]
        self.up = nn.Sequential()
        for n in range(len(up) - 1):
            self.up.add_module(f"res_up_{n}", ResUp(up[n + 1], up[n], nbase[-1], kernel))

    def forward(self, style: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """style (B, nbase[-1]), encoder maps -> (B, nbase[1], H, W)."""
        levels = list(self.up)
        x = levels[-1](maps[-1], maps[-1], style)
        for n in range(len(levels) - 2, -1, -1):
            x = levels[n](F.interpolate(x, scale_factor=2.0, mode="nearest"), maps[n], style)
        return x


class CPnet(nn.Module):
    """Classic Cellpose residual U-Net (cellpose 1-3 layout; also the distillation students).

    Args:
        nbase: channels per level, input channels first: [2, 32, 64, 128, 256] for classic Cellpose
            (2 input channels: cytoplasm, nucleus), e.g. [1, 32, 64] for a small student.
        nout: output channels (3: dY, dX, cell-probability logit).
        kernel: convolution kernel size (odd; 3 in every released model).
        diam_mean: mean cell diameter in pixels the net was trained at (30 for cyto3, 27 for cyto_0).

    Attributes follow the cpsam model interface: `diam_mean`, `diam_labels` (non-trainable (1,)
    parameters), `tile_size` (224), `in_channels` (nbase[0]).
    """

    model_name: str = "cpnet"

    def __init__(self, nbase: Sequence[int], nout: int = 3, kernel: int = 3, diam_mean: float = 30.0) -> None:
        super().__init__()
        nbase = [int(c) for c in nbase]
        if len(nbase) < 2 or min(nbase) < 1:
            raise ValueError(f"nbase needs input channels and at least one level, all positive; got {nbase}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {kernel}")
        self.nbase = nbase
        self.nout = int(nout)
        self.kernel = int(kernel)
        self.tile_size = CPNET_TILE_SIZE
        self.in_channels = nbase[0]
        self.downsample = Encoder(nbase, kernel)
        self.upsample = Decoder(nbase, kernel)
        self.output = bn_relu_conv(nbase[1], nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)

    @property
    def style_channels(self) -> int:
        """Length of the style vector (nbase[-1]; 256 for classic Cellpose)."""
        return self.nbase[-1]

    @property
    def feature_channels(self) -> int:
        """Channels of the feature map feeding the output block (nbase[1]; 32 for every student)."""
        return self.nbase[1]

    def model_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild this architecture (`create_model("cpnet", **kwargs)`)."""
        return {"nbase": list(self.nbase), "nout": self.nout, "kernel": self.kernel}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the net.

        Args:
            x: (B, nbase[0], H, W) float, H and W divisible by 2**(len(nbase) - 2).

        Returns:
            output (B, nout, H, W): [dY, dX, cell-probability logit], flows at 5x unit length;
            style (B, nbase[-1]): the L2-normalized global average of the deepest encoder map;
            features (B, nbase[1], H, W): the decoder output that feeds the output block.
        """
        step = 2 ** (len(self.nbase) - 2)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(
                f"CPnet{self.nbase} needs input (B, {self.in_channels}, H, W) with H and W divisible by "
                f"{step}, got {tuple(x.shape)} (pad the image first)"
            )
        maps = self.downsample(x)
        style = F.normalize(maps[-1].mean(dim=(2, 3)), dim=1)
        features = self.upsample(style, maps)
        return self.output(features), style, features


@register_model("cpnet")
def build_cpnet(
    nbase: Sequence[int] = CYTO_NBASE, nout: int = 3, kernel: int = 3, diam_mean: float = 30.0
) -> CPnet:
    """`create_model("cpnet", nbase=[...])`: a randomly initialized CPnet (defaults: classic Cellpose)."""
    return CPnet(nbase, nout=nout, kernel=kernel, diam_mean=diam_mean)


_DOWN_CONV0 = re.compile(r"^downsample\.down\.res_down_(\d+)\.conv\.conv_0\.2\.weight$")
_OPTIONAL_KEYS = re.compile(r"(^diam_mean$|^diam_labels$|\.num_batches_tracked$)")


def infer_cpnet_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Infer `{"nbase", "nout", "kernel"}` from the tensor shapes of a classic CPnet state_dict.

    Raises ValueError (saying which keys are missing) when the dict is not a CPnet state_dict.
    """
    levels = {int(m.group(1)): state_dict[k] for k in state_dict if (m := _DOWN_CONV0.match(k))}
    missing = [name for name in ("downsample.down.res_down_0.conv.conv_0.2.weight", "output.2.weight")
               if name not in state_dict]
    if missing or sorted(levels) != list(range(len(levels))):
        why = f"missing {', '.join(missing)}" if missing else f"encoder levels {sorted(levels)} are not 0..n"
        raise ValueError(f"not a classic Cellpose (CPnet) state_dict: {why}")
    first = levels[0]
    if first.ndim != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"not a CPnet state_dict: first conv weight has shape {tuple(first.shape)}")
    nbase = [int(first.shape[1])] + [int(levels[n].shape[0]) for n in range(len(levels))]
    nout = int(state_dict["output.2.weight"].shape[0])
    return {"nbase": nbase, "nout": nout, "kernel": int(first.shape[-1])}


def cpnet_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> CPnet:
    """Build a CPnet whose architecture matches `state_dict` and load every tensor into it.

    Accepts cellpose 1-3 classic files and our own CPnet checkpoints' state_dicts. Only
    `diam_mean`/`diam_labels` (default 30, diam_labels = diam_mean) and BatchNorm
    `num_batches_tracked` may be absent; any other missing or unexpected key, or a shape mismatch,
    raises ValueError naming the keys. The returned model is in train mode on the CPU.
    """
    config = infer_cpnet_config(state_dict)
    model = CPnet(**config)  # type: ignore[arg-type]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _OPTIONAL_KEYS.search(k)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"state_dict does not match CPnet(nbase={config['nbase']}): " + "; ".join(problems))
    full = dict(expected)
    full.update(state_dict)
    if "diam_mean" in state_dict and "diam_labels" not in state_dict:
        full["diam_labels"] = state_dict["diam_mean"]
    model.load_state_dict(full, strict=True)
    return model
