"""The student's side of the feature term: which of its maps is matched to the teacher's, and how to get it.

A CPnet student (every registry name of the family) exposes
- "decoder": the map before its output block, (nbase[1], T, T): what CPnet teachers' "decoder" map is matched to
  (32 channels for the seed's students: no adapter needed);
- "encoder{n}": the encoder level n output (nbase[n + 1], T / 2**n, T / 2**n), read with a forward hook on
  `net.downsample` (the net's own forward runs once; nothing is recomputed). A CP-SAM teacher's neck
  (256, T/8, T/8) is matched to the encoder level of the closest resolution: for [1, 32, 64, 128, 256] that is
  level 3, (256, T/8, T/8), the same shape as the neck.
Other students give "decoder" when their forward returns a third value (a feature map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def student_forward(net: nn.Module, x: Tensor, feature: str | None) -> tuple[Tensor, Tensor | None]:
    """(output (B, 3, T, T), the named feature map or None) of one student forward pass on x (B, C, T, T).

    feature: "decoder", "encoder{n}" or None (no feature). Raises ValueError when the student lacks that map.
    """
    if feature is None or feature == "decoder":
        result = net(x)
        if feature is None:
            return result[0], None
        if not (isinstance(result, tuple) and len(result) >= 3):
            raise ValueError(f"student {type(net).__name__} returns no feature map (its forward gives {len(result)} "
                             "values); use kd.features=none")
        return result[0], result[2]
    level = int(feature.removeprefix("encoder"))
    captured: list[list[Tensor]] = []
    encoder = getattr(net, "downsample", None)
    if encoder is None:
        raise ValueError(f"student {type(net).__name__} has no encoder levels (net.downsample); use kd.features=none")
    handle = encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        output = net(x)[0]
    finally:
        handle.remove()
    return output, captured[-1][level]


@torch.no_grad()
def student_feature_shapes(net: nn.Module, tile: int, channels: int) -> dict[str, tuple[int, int, int]]:
    """{name: (C, h, w)} of the student's maps for a (tile x tile) input, found by one dry forward pass in eval
    mode (the module's training flag is restored; BatchNorm statistics are untouched)."""
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        x = torch.zeros(1, channels, tile, tile, dtype=param.dtype, device=param.device)
        captured: list[list[Tensor]] = []
        encoder = getattr(net, "downsample", None)
        handle = encoder.register_forward_hook(lambda _m, _i, out: captured.append(out)) if encoder else None
        try:
            result = net(x)
        finally:
            if handle is not None:
                handle.remove()
    finally:
        net.train(was_training)
    shapes: dict[str, tuple[int, int, int]] = {}
    if isinstance(result, tuple) and len(result) >= 3:
        shapes["decoder"] = tuple(int(v) for v in result[2].shape[1:])  # type: ignore[assignment]
    if captured and isinstance(captured[-1], (list, tuple)):
        for n, m in enumerate(captured[-1]):
            shapes[f"encoder{n}"] = tuple(int(v) for v in m.shape[1:])  # type: ignore[assignment]
    return shapes


def match_student_feature(student_shapes: dict[str, tuple[int, int, int]], teacher_shape: tuple[int, int, int],
                          tile: int) -> str:
    """The student map the teacher map of `teacher_shape` (C, h, w) is matched to: "decoder" for a full-resolution
    teacher map, else the encoder level of the closest resolution (ties: the deeper). ValueError when none fits."""
    if teacher_shape[1] == tile and "decoder" in student_shapes:
        return "decoder"
    levels = [k for k in student_shapes if k.startswith("encoder")]
    if not levels:
        if "decoder" in student_shapes:
            return "decoder"
        raise ValueError("the student has no feature map to match the teacher's; use kd.features=none")

    def distance(name: str) -> tuple[float, int]:
        return abs(math.log2(student_shapes[name][1] / teacher_shape[1])), -int(name.removeprefix("encoder"))

    return min(levels, key=distance)
