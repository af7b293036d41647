"""Start a student from its teacher's weights wherever the two networks share a layer (kd.init_from_teacher).

Why: the students of the seed's family are CPnets like cyto_0 with fewer levels and one input channel, so their
full-resolution layers (the costly ones) have exactly the teacher's shapes. Copying them (as DistilBERT starts its
student from the teacher's layers) gives distillation a head start that 20 CPU minutes of training from scratch
cannot reach. What is copied: every tensor of the student's state_dict whose name and shape are the teacher's; and
the input layer's tensors that differ only in the input channels (student channel i is the teacher's channel i,
distill.student_input), sliced to the student's channels. The teacher's dropped channels are all zero in the
student's use (cyto_0 on grayscale input, channels 0 0), but its input BatchNorm turns zero into a constant that
its first convolutions see: that constant's contribution (with the BatchNorm's running statistics) is folded into
those convolutions' biases, exact away from the image border (where the teacher's zero padding differs). A 1-channel
student of the teacher's own shape therefore starts as the teacher (up to that border; with cyto_0's weights
equal to float32 precision everywhere, tests/distill/test_distill_teacher_init.py); a smaller student keeps the
teacher's shallow levels and learns the rest (its deepest up-block and the style projections, whose shapes
differ). Everything else keeps its random initialization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# the student's own (frozen) tensors, never the teacher's: diam_mean is the scale it segments at (kd.student_scale
# makes it the teacher's times the scale; copying it ran a half-scale student at the teacher's scale), diam_labels
# its training diameter
OWN_TENSORS = frozenset({"diam_mean", "diam_labels"})


@dataclass
class TeacherInit:
    """What `init_from_teacher` did: names copied whole, names sliced to the student's input channels, conv biases
    that took the dropped channels' constant (`folded`, among `copied`), names of the student left as they were,
    and the fraction of the student's parameters (by count) taken from the teacher."""

    copied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fraction: float = 0.0

    def summary(self) -> str:
        """One line for the run's log."""
        return (f"kd.init_from_teacher: {len(self.copied)} tensors copied, {len(self.sliced)} sliced to the "
                f"student's input channels, {len(self.kept)} left random; {self.fraction:.1%} of the student's "
                "parameters come from the teacher")


def _input_slice(student: torch.Tensor, teacher: torch.Tensor, student_in: int, teacher_in: int) -> int | None:
    """The dimension in which `student` is `teacher` cut to the student's input channels, or None."""
    if student.dim() != teacher.dim() or student_in >= teacher_in:
        return None
    differ = [d for d in range(student.dim()) if student.shape[d] != teacher.shape[d]]
    if len(differ) == 1 and teacher.shape[differ[0]] == teacher_in and student.shape[differ[0]] == student_in:
        return differ[0]
    return None


def init_from_teacher(student: nn.Module, teacher: nn.Module, load: bool = True) -> TeacherInit:
    """Copy into `student` (in place) the teacher's tensors that fit it (module docstring); with `load=False` only
    say what would be copied (a resumed run re-applies `freeze_copied_batchnorms` to its own weights).

    Both networks carry `in_channels` (their image channels). The student's input layer is recognized by a single
    differing dimension whose sizes are the two networks' input channels. Returns what was done (TeacherInit);
    ValueError when nothing fits (another architecture: starting "from the teacher" would be a silent no-op).
    """
    student_in, teacher_in = int(student.in_channels), int(teacher.in_channels)
    theirs = teacher.state_dict()
    ours = student.state_dict()
    report = TeacherInit()
    new_state = {}
    taken = total = 0
    params = {name for name, p in student.named_parameters() if p.requires_grad}  # not diam_mean / diam_labels
    for name, tensor in ours.items():
        if name in OWN_TENSORS:
            continue
        source = theirs.get(name)
        numel = tensor.numel() if name in params else 0
        total += numel
        if source is not None and source.shape == tensor.shape:
            new_state[name] = source.detach().to(tensor.dtype)
            report.copied.append(name)
            taken += numel
            continue
        dim = _input_slice(tensor, source, student_in, teacher_in) if source is not None else None
        if dim is not None:
            new_state[name] = source.detach().narrow(dim, 0, student_in).to(tensor.dtype)
            report.sliced.append(name)
            taken += numel
        else:
            report.kept.append(name)
    if taken == 0:
        raise ValueError(f"no tensor of the teacher ({type(teacher).__name__}) fits the student "
                         f"({type(student).__name__}): kd.init_from_teacher needs a student of the teacher's family")
    if load:
        student.load_state_dict(new_state, strict=False)
        report.folded = _fold_dropped_channels(student, theirs, set(report.sliced), student_in)
    report.fraction = taken / total if total else 0.0
    return report


@torch.no_grad()
def _fold_dropped_channels(student: nn.Module, theirs: dict[str, torch.Tensor], sliced: set[str],
                           student_in: int) -> list[str]:
    """For each BatchNorm -> [ReLU] -> Conv sequence of the student whose BatchNorm was cut to the student's input
    channels: add to the conv's bias what the teacher's conv received from the dropped channels of a zero input,
    conv(act(BN_teacher(0))), which is act(bias - weight * mean / sqrt(var + eps)) times the kernel's sum (module
    docstring; eval-mode statistics). Returns the names of the biases changed."""
    folded = []
    for name, module in student.named_modules():
        if not (isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[0], nn.BatchNorm2d)
                and f"{name}.0.weight" in sliced):
            continue
        bn = module[0]
        prefix = f"{name}.0."
        weight, bias = theirs[prefix + "weight"][student_in:], theirs[prefix + "bias"][student_in:]
        mean, var = theirs[prefix + "running_mean"][student_in:], theirs[prefix + "running_var"][student_in:]
        value = bias - weight * mean / torch.sqrt(var + bn.eps)
        index, layers = 1, list(module)
        while index < len(layers) and not isinstance(layers[index], nn.Conv2d):
            if isinstance(layers[index], nn.ReLU):
                value = value.clamp(min=0)
            index += 1
        if index == len(layers) or layers[index].bias is None:
            continue
        conv_weight = theirs[f"{name}.{index}.weight"][:, student_in:]  # (out, dropped, k, k)
        layers[index].bias += (conv_weight.sum(dim=(2, 3)) * value.to(conv_weight.dtype)).sum(dim=1)
        folded.append(f"{name}.{index}.bias")
    return folded


def _freeze_statistics(module: nn.Module, _args: tuple) -> None:
    module.training = False  # normalize with the running (teacher's) statistics and leave them as they are


def freeze_copied_batchnorms(student: nn.Module, report: TeacherInit) -> list[str]:
    """Keep the student's BatchNorms whose weights came from the teacher (`report`) in eval mode for good: in
    training they normalize with the teacher's running statistics and never update them (a forward pre-hook, so
    `student.train()` does not undo it). Why: a student trained with batch statistics has its running statistics
    replaced by those of the training crops (momentum 0.05: 98 % after 80 steps) and no longer normalizes as its
    teacher at inference (what that cost a twin of cyto_0: docs/results/distillation.md).
    Returns the names of the frozen modules."""
    taken = set(report.copied) | set(report.sliced)
    names = []
    for name, module in student.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in taken:
            module.register_forward_pre_hook(_freeze_statistics)
            names.append(name)
    return names
