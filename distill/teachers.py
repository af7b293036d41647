"""Teachers of distillation: any model `cpsam segment --model` opens, alone or as an ensemble.

A teacher maps a batch of input tiles at ITS scale and normalization (the training pipeline's crop: cells at
the teacher's diam_mean, percentile-normalized) to its raw output and named feature maps:

    teacher = load_teacher(["cyto_0"])            # or a model file, a run folder, several specs (an ensemble)
    out = teacher.teach(x)                        # x (B, C >= teacher.in_channels, T, T) float32
    out.output                                    # (B, 3, T, T) float32 [dY, dX, cellprob logit], flows at 5x
    out.features["decoder"]                       # CPnet: (B, nbase[1], T, T), the map before the output block

Feature maps by model kind (`feature_shapes` gives them without running the net):
- CPnet (classic Cellpose, students): "decoder", the decoder output that feeds the output block (32 channels for
  every released model), at full resolution;
- CP-SAM: "neck", the encoder neck (out_chans = 256 channels at T/8 x T/8 tokens), and "readout", the 1x1 conv
  output before the pixel shuffle (3 * 8 * 8 = 192 channels at T/8 x T/8).
An ensemble (cellpose 2's `net_avg`) averages its members' raw outputs; its features are those of the first
member (members' feature spaces are not aligned channel by channel, so averaging them would mean nothing).
Teachers are frozen: eval mode, no gradients, float32.

An augmented teacher (`augment=True`; `cpsam distill cache --teacher-augment`, kd.teacher_augment) averages
over the four flips of each tile (none, Y, X, both: the patterns of `cpsam segment --augment`,
`cpsam.transforms.flip_pattern`): every flipped tile's output is un-flipped with `cpsam.transforms.unflip_output`
(flow components negated along flipped axes) and its feature maps are flipped back (no sign: a feature is not a
vector) before the mean. The four flips form a group, so the result is flip-equivariant by construction:
teaching a flipped tile gives the flipped (and, for flows, sign-corrected) result, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsam import transforms
from cpsam.models import ModelSpecError, resolve_model
from cpsam.models.cellpose_sam import CellposeSAM
from cpsam.models.cpnet import CPnet
from cpsam.segment import InferenceRules, rules_for

FEATURE_NAMES = ("decoder", "neck", "readout")


class TeacherError(ValueError):
    """A teacher that cannot be loaded or used as asked; the message names the spec and the problem."""


@dataclass
class TeacherOutput:
    """What a teacher yields for a tile batch: output (B, 3, T, T) float32 and {name: (B, C, h, w) float32}."""

    output: Tensor
    features: dict[str, Tensor]


def model_kind(model: nn.Module) -> str:
    """"cpsam" (CellposeSAM), "cpnet" (CPnet and its students) or "other"."""
    if isinstance(model, CellposeSAM):
        return "cpsam"
    if isinstance(model, CPnet):
        return "cpnet"
    return "other"


def _freeze(model: nn.Module) -> nn.Module:
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Teacher:
    """One frozen model as a teacher.

    Args:
        model: a cpsam network (`diam_mean`, `tile_size`, `in_channels`; `model(x)[0]` the output).
        spec: what it was loaded from (recorded in caches and checkpoints).
    """

    def __init__(self, model: nn.Module, spec: str = "<model>", augment: bool = False) -> None:
        self.model = _freeze(model)
        self.spec = str(spec)
        self.kind = model_kind(model)
        self.augment = bool(augment)

    # ----------------------------------------------------------------- properties
    @property
    def net(self) -> nn.Module:
        """The module `cpsam.segment.Segmenter` runs to segment whole images with this teacher."""
        return self.model

    @property
    def members(self) -> list[Teacher]:
        """The single models of this teacher (itself)."""
        return [self]

    @property
    def specs(self) -> list[str]:
        """The specs of the models of this teacher."""
        return [self.spec]

    @property
    def in_channels(self) -> int:
        """Input channels the teacher reads (the first ones of a crop)."""
        return int(self.model.in_channels)

    @property
    def tile_size(self) -> int:
        """The teacher's tile size in px (CP-SAM needs exactly this crop size; CPnet takes any multiple of 8)."""
        return int(self.model.tile_size)

    @property
    def diam_mean(self) -> float:
        """The cell diameter in px the teacher works at (crops are rescaled so cells are this wide)."""
        return float(self.model.diam_mean.detach().float().cpu()[0])

    @property
    def size_model(self) -> Any:
        """The classic size model attached to the teacher (cyto_0 has one), or None."""
        return getattr(self.model, "size_model", None)

    @property
    def rules(self) -> InferenceRules:
        """The inference rules `cpsam segment` applies to this teacher (cellpose 3 for CPnet, 4 otherwise)."""
        return rules_for(self.model)

    @property
    def default_feature(self) -> str:
        """The feature map kd.features=auto matches: CPnet's "decoder" map, CP-SAM's "neck"."""
        return "neck" if self.kind == "cpsam" else "decoder"

    def to(self, device: torch.device | str) -> Teacher:
        """Move the model to `device` (in place); returns self."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights are."""
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """Plain facts for manifests and checkpoints: specs, kind, channels, tile, diam_mean, rules."""
        rules = self.rules
        return {"specs": self.specs, "kind": self.kind, "in_channels": self.in_channels, "tile_size": self.tile_size,
                "diam_mean": self.diam_mean, "mask_rules": rules.mask_rules}

    # ----------------------------------------------------------------- features
    def feature_shapes(self, tile: int) -> dict[str, tuple[int, int, int]]:
        """{name: (channels, h, w)} of the feature maps for a (tile x tile) input, computed from the architecture."""
        m = self.model
        if self.kind == "cpnet":
            return {"decoder": (int(m.feature_channels), tile, tile)}
        if self.kind == "cpsam":
            grid = tile // int(m.patch_size)
            return {"neck": (int(m.config.out_chans), grid, grid),
                    "readout": (int(m.out.out_channels), grid, grid)}
        return {}

    def check_input(self, x: Tensor) -> Tensor:
        """`x` cut to the teacher's channels; TeacherError for too few channels or a wrong CP-SAM tile."""
        if x.ndim != 4 or x.shape[1] < self.in_channels:
            raise TeacherError(f"teacher {self.spec} needs (B, >= {self.in_channels}, T, T) tiles, got "
                               f"{tuple(x.shape)}")
        if self.kind == "cpsam" and tuple(x.shape[-2:]) != (self.tile_size, self.tile_size):
            raise TeacherError(f"teacher {self.spec} (CP-SAM) needs {self.tile_size} x {self.tile_size} tiles, got "
                               f"{tuple(x.shape[-2:])}; set data.tile_size={self.tile_size}")
        return x[:, : self.in_channels]

    @torch.no_grad()
    def teach(self, x: Tensor, features: Sequence[str] | None = None) -> TeacherOutput:
        """Run the teacher on a tile batch (averaged over the four flips when `augment`; module docstring).

        x: (B, C, T, T) float, C >= in_channels (the first in_channels are used), on the teacher's device.
        features: names to return (None = all the model has; [] = none).
        Returns TeacherOutput: output (B, 3, T, T) float32 [dY, dX, cellprob logit], features float32 maps.
        """
        if not self.augment:
            return self._teach(x, features)
        outputs: list[Tensor] = []
        feats: dict[str, list[Tensor]] = {}
        for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
            flip_y, flip_x = transforms.flip_pattern(row, col)
            dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
            taught = self._teach(torch.flip(x, dims) if dims else x, features)
            outputs.append(transforms.unflip_output(taught.output, flip_y, flip_x))
            for name, f in taught.features.items():
                feats.setdefault(name, []).append(torch.flip(f, dims) if dims else f)
        return TeacherOutput(torch.stack(outputs).mean(0), {n: torch.stack(v).mean(0) for n, v in feats.items()})

    def _teach(self, x: Tensor, features: Sequence[str] | None = None) -> TeacherOutput:
        """`teach` without the augmentation: one pass of the network."""
        x = self.check_input(x).to(self.device, torch.float32)
        m = self.model
        feats: dict[str, Tensor] = {}
        if self.kind == "cpsam":
            neck = m.forward_features(x)
            readout = m.out(neck)
            output = F.pixel_shuffle(readout, m.patch_size)
            feats = {"neck": neck, "readout": readout}
        else:
            result = m(x)
            output = result[0]
            if self.kind == "cpnet" or (isinstance(result, tuple) and len(result) >= 3):
                feats = {"decoder": result[2]}
        wanted = list(feats) if features is None else list(features)
        missing = [n for n in wanted if n not in feats]
        if missing:
            raise TeacherError(f"teacher {self.spec} ({self.kind}) has no feature map {missing[0]!r}; it has "
                               f"{', '.join(feats) or 'none'}")
        return TeacherOutput(output[:, -3:].float(), {n: feats[n].float() for n in wanted})


class EnsembleNet(nn.Module):
    """Several frozen networks as one for `cpsam.segment.Segmenter`: the mean of their outputs (and styles).

    Follows the cpsam model interface of its first member (diam_mean, diam_labels, tile_size); in_channels is the
    largest member's, each member reading its first channels.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        first = nets[0]
        self.diam_mean = nn.Parameter(first.diam_mean.detach().clone(), requires_grad=False)
        self.diam_labels = nn.Parameter(first.diam_labels.detach().clone(), requires_grad=False)
        self.tile_size = int(first.tile_size)
        self.in_channels = max(int(n.in_channels) for n in nets)
        styles = {int(getattr(n, "style_channels", 0) or 0) for n in nets}
        self.style_channels = styles.pop() if len(styles) == 1 else 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, in_channels, h, w) -> (mean output (B, 3, h, w), mean style (B, S) or zeros (B, 0))."""
        outs, styles = [], []
        for net in self.nets:
            result = net(x[:, : int(net.in_channels)])
            outs.append(result[0][:, -3:].float())
            styles.append(result[1].float())
        output = torch.stack(outs).mean(0)
        style = torch.stack(styles).mean(0) if self.style_channels else output.new_zeros(x.shape[0], 0)
        return output, style


class Ensemble(Teacher):
    """Several teachers whose raw outputs are averaged (cellpose 2's net_avg); features of the first member.

    Members must work at the same cell diameter (they see the same crop); raises TeacherError otherwise.
    """

    def __init__(self, members: Sequence[Teacher]) -> None:
        if len(members) < 2:
            raise TeacherError("an ensemble needs at least two teachers")
        diams = {round(t.diam_mean, 4) for t in members}
        if len(diams) > 1:
            raise TeacherError(f"ensemble members work at different cell diameters ({sorted(diams)} px): they would "
                               "need different crops; use teachers of one diam_mean")
        if any(t.kind == "cpsam" for t in members) and len({t.tile_size for t in members}) > 1:
            raise TeacherError("ensemble members need one tile size (CP-SAM takes only its own)")
        self._members = list(members)
        super().__init__(EnsembleNet([t.model for t in members]), spec="+".join(t.spec for t in members))
        self.kind = members[0].kind

    @property
    def members(self) -> list[Teacher]:
        """The member teachers, in order."""
        return list(self._members)

    @property
    def specs(self) -> list[str]:
        """The members' specs, in order."""
        return [t.spec for t in self._members]

    @property
    def in_channels(self) -> int:
        """The largest member's input channels."""
        return max(t.in_channels for t in self._members)

    @property
    def tile_size(self) -> int:
        """The first member's tile size."""
        return self._members[0].tile_size

    @property
    def size_model(self) -> Any:
        """The first member's size model (diameters are estimated with the first member alone)."""
        return self._members[0].size_model

    @property
    def rules(self) -> InferenceRules:
        """The first member's inference rules."""
        return self._members[0].rules

    @property
    def default_feature(self) -> str:
        """The first member's default feature map."""
        return self._members[0].default_feature

    def feature_shapes(self, tile: int) -> dict[str, tuple[int, int, int]]:
        """The first member's feature shapes."""
        return self._members[0].feature_shapes(tile)

    def to(self, device: torch.device | str) -> Ensemble:
        """Move every member to `device`; returns self."""
        for t in self._members:
            t.to(device)
        self.model.to(device)
        return self

    def _teach(self, x: Tensor, features: Sequence[str] | None = None) -> TeacherOutput:
        """Mean raw output of the members (B, 3, T, T) float32; the first member's features (see Teacher.teach)."""
        first = self._members[0].teach(x, features)
        outputs = [first.output] + [t.teach(x, []).output for t in self._members[1:]]
        return TeacherOutput(torch.stack(outputs).mean(0), first.features)


def load_teacher(specs: str | Sequence[str], device: torch.device | str = "cpu", augment: bool = False) -> Teacher:
    """A Teacher from one spec, an Ensemble from several: what `cpsam segment --model` takes (pretrained names
    such as cyto_0, official cpsam / classic Cellpose files, our model.pt files and run folders); `augment`: the
    flip-averaged teacher (module docstring; an ensemble averages the flips of its mean output).

    A classic model's size model beside its file is attached (cpsam.models.resolve_model). Raises TeacherError
    naming the spec when a model cannot be loaded.
    """
    names = [specs] if isinstance(specs, str) else [str(s) for s in specs]
    if not names or not all(n.strip() for n in names):
        raise TeacherError("give a teacher: a pretrained name (cyto_0), a model file or a run folder")
    teachers = []
    for name in names:
        try:
            model = resolve_model(name, torch.device(device))
        except ModelSpecError as exc:
            raise TeacherError(f"teacher {name}: cannot load it ({exc})") from exc
        teachers.append(Teacher(model, name))
    teacher = teachers[0] if len(teachers) == 1 else Ensemble(teachers)
    teacher.augment = bool(augment)
    return teacher
