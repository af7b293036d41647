"""Run configs: one dataclass tree describes one training run completely (DESIGN.md, Conventions).

A run is `TrainConfig` loaded from YAML with `key=value` overrides (OmegaConf dotlist), e.g.

    cfg = load_config("scripts/configs/tiny_cpu.yaml", ["batch_size=4", "optim.lr=1e-4"])

The resolved config is saved as `config.yaml` in the run folder; a rerun on that folder compares
its resolved config with the saved one (see `train.loop`). The augmentation, degradation and
schedule sections are the dataclasses of the modules that use them (one definition each).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpsam.cli_types import TILE_SIZE_LIMITS, size_problem
from train.augment import AugmentConfig
from train.degrade import DegradeConfig
from train.host_memory import parse_threshold
from train.optim_in_backward import normalize_setting
from train.schedule import ScheduleConfig


class ConfigError(ValueError):
    """A config that cannot describe a run; the message names the file or key and the problem."""


@dataclass
class ModelConfig:
    """The network. `name` is a `cpsam.models.create_model` registry name (cpsam_vit_l, cpsam_tiny, cpnet, ...).

    `init`: weights to start from: a SAM checkpoint, an official cpsam file, a classic Cellpose file,
    one of our checkpoints or run folders, or a pretrained name such as cyto_0; empty = random.
    `nbase`: CPnet channels per level (input channels first), e.g. [2, 32, 64, 128, 256].
    `layer_drop`: CP-SAM's maximal per-sample layer-drop rate (None = the model's default 0.4).
    `diam_mean`: the cell diameter (px) the model is trained at (None = the model's, 30).
    `tile_size`: CP-SAM input tile in px (None = 256; 128 makes a 16 x 16 token grid, for small CPU runs).
    `sync_batchnorm`: with several CUDA processes, BatchNorm layers (CPnet, students) compute their batch
    statistics over the global micro-batch (SyncBatchNorm; it does not run on CPU). Without it, each rank
    normalizes with its own share of the batch and DDP broadcasts rank 0's running statistics, so a
    BatchNorm model trained on N processes differs from the 1-process run (LayerNorm models do not).
    """

    name: str = "cpsam_tiny"
    nbase: list[int] | None = None
    layer_drop: float | None = None
    init: str = ""
    diam_mean: float | None = None
    tile_size: int | None = None
    sync_batchnorm: bool = True
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class DataConfig:
    """Training and validation data: lists of canonical dataset folders.

    An entry of `train` is a folder, or `{path: DIR, weight: W}` (per-dataset sampling probability;
    all entries then need one). Without explicit weights `weights` applies: "size" (proportional to
    images), "balanced" (equal per dataset) or a list of probabilities.
    `train_split` / `val_split`: which rows of each index.csv are used (null = all rows).
    `channels`: input channels fed to the net (null = the model's). `tile_size`: crop size (null = the
    model's: 256 CP-SAM, 224 CPnet). `cache_mb`: per-worker cache of decoded images (0 = off).
    `check_pixels`: read every image once before training and leave out those with NaN/Inf pixels.
    """

    train: list[Any] = field(default_factory=list)
    val: list[Any] = field(default_factory=list)
    weights: Any = "size"
    train_split: str | None = "train"
    val_split: str | None = "val"
    min_train_masks: int = 5
    channels: int | None = None
    tile_size: int | None = None
    num_workers: int = 2
    cache_mb: int = 512
    check_pixels: bool = True


@dataclass
class OptimConfig:
    """AdamW (cellpose and the paper always use AdamW). `grad_clip` = max global grad norm, 0 = off.

    `step_in_backward`: update each parameter as soon as its gradient is ready and free that gradient
    (train.optim_in_backward; the same result bit for bit, less memory): "auto" (default) = on a CPU device when
    nothing blocks it (one process, no gradient accumulation, no grad_clip), "on" = wherever nothing blocks it
    (an error names what does), "off" = never.
    """

    lr: float = 5e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0
    step_in_backward: str = "auto"


@dataclass
class CheckpointConfig:
    """Full-state checkpoints (`checkpoints/last`, `checkpoints/best`) every `every_steps` optimizer steps."""

    every_steps: int = 500


@dataclass
class ValConfig:
    """Validation by AP on whole images of `data.val`, every `every_epochs` epochs (0 = never; also at the end).

    `diameter`: "auto" (the image's median ground-truth diameter when training rescales to diam_mean,
    else the model's own), "true" or "model". `max_images`: cap per validation (null = all).
    `mask_rules`: the flow -> mask rules ("cp3": cellpose 3's, "cp4": cellpose 4's; "" = the model's own, cp3 for
    a classic CPnet, cp4 otherwise). Recorded in model.pt, so `cpsam segment` applies them too (a student
    distilled from a CPnet teacher gets the teacher's cp3 rules whatever its architecture).
    """

    every_epochs: int = 10
    max_images: int | None = None
    batch_size: int = 8
    diameter: str = "auto"
    niter: int | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    mask_rules: str = ""


@dataclass
class LogConfig:
    """Logging: `metrics.csv` always; TensorBoard via accelerate's trackers when installed and enabled.

    `sample_keys`: every rank appends the keys of the samples it trains on to `samples/rank{R}.csv`
    (step, epoch, position, dataset_index, example_index): an audit of the data order.
    """

    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True
    sample_keys: bool = False


@dataclass
class KDConfig:
    """Knowledge distillation (objective=distill; distill/objective.py reads it, `cpsam distill` fills it).

    `teacher`: the teacher model(s) (what `cpsam segment --model` takes; several = an ensemble averaging raw
    outputs). `cache`: a teacher-output cache folder (`cpsam distill cache`); empty = online (the teacher runs
    inside the training step). `loss`: "mse" (our default: a true mean squared error of the features) or
    "distillcellsegtrack" (the seed's published feature term, the squared mean difference). The loss is
    `alpha * feature term + beta * (flow MSE / 2 + T^2 * BCE(student logit / T, sigmoid(teacher logit / T)))`
    (T = `temperature`) plus `gt_weight` times the Cellpose loss against the dataset's masks (ground truth, or the
    teacher's masks when the data were labelled by the teacher). `features`: which teacher map the feature term
    matches ("auto": CPnet's 32-channel decoder map, CP-SAM's neck; "decoder", "neck", "readout"; "none": no
    feature term). `flat_field`: student input flat-field corrected (normalized convolution, Gaussian
    `flat_field_sigma` px); `cpsam segment` does not apply it. Brightness augmentation of the student's input:
    with probability `brightness_p` a factor ~ U(`brightness_min`, `brightness`) (the seed: 0.5, 0.1-3);
    `brightness` = 0: off. `val_crops`: fixed crops per validation image for `val_kd_loss` (0 = not computed).
    Recorded for inference (`cpsam distill` sets them): `channels`, the cellpose-3 [SEG, NUC] channels the
    teacher's data were made with (null = the first channels), and `diameter`, the diameter (px) the teacher
    segmented at (0 = its size model's estimate or its own); the mask rules are `val.*`.
    `init_from_teacher`: a fresh student starts from the teacher's weights wherever name and shape match (and its
    input layer from the teacher's first channels; distill.teacher_init); one teacher only; false = model.init.
    `freeze_copied_bn` (with init_from_teacher): the BatchNorms taken from the teacher keep its running
    statistics, in training too (else training crops' batch statistics replace them).
    `student_scale` (0 < s <= 1): the student works at s times the teacher's resolution: it sees the teacher's crop
    area-averaged to round(s x T) px and learns the teacher's outputs averaged the same way, and its diam_mean is
    s x the teacher's (so `cpsam segment` shrinks images for it; flows come back at full size as the teacher's
    do). 0.5: cells of 15 px for a cyto teacher, 4x fewer pixels per image, and a shallow student's receptive
    field spans twice as many cell diameters.
    `teacher_augment`: the teacher's outputs and features averaged over the four flips of each crop (flip-equivariant
    targets; `cpsam distill --teacher-augment`); a cache records its own setting (`cpsam distill cache
    --teacher-augment`) and a run with a cache follows it.
    `calibrate_flow_threshold`: after training, `cpsam distill` picks the student's own flow threshold on its
    training images against the teacher's masks and records it in model.pt (distill.calibrate); false: the
    student keeps cellpose's 0.4.
    """

    teacher: list[str] = field(default_factory=list)
    cache: str = ""
    loss: str = "mse"
    alpha: float = 2.0
    beta: float = 1.0
    temperature: float = 1.0
    features: str = "auto"
    gt_weight: float = 0.0
    flat_field: bool = False
    flat_field_sigma: float = 30.0
    brightness: float = 0.0
    brightness_min: float = 0.1
    brightness_p: float = 0.5
    val_crops: int = 1
    channels: list[int] | None = None
    diameter: float = 0.0
    init_from_teacher: bool = False
    freeze_copied_bn: bool = True
    student_scale: float = 1.0
    teacher_augment: bool = False
    calibrate_flow_threshold: bool = True


@dataclass
class BinaryConfig:
    """Cell / background segmentation (objective=binary or binary_distill; train/binary/objective.py reads it).

    `class_weights`: cross-entropy weight per class [background, cell] (raising the cell weight trades
    precision for recall). `loading_code`: how channels are loaded per sample (see docs/commands/binary.md).
    `teacher` / `temperature`: soft targets of binary distillation.
    """

    num_classes: int = 2
    class_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    loading_code: str = ""
    teacher: str = ""
    temperature: float = 1.0


@dataclass
class TrainConfig:
    """One training run. `batch_size` is the GLOBAL batch (all processes, all accumulation steps).

    `micro_batch_size`: samples per process per forward (null = batch_size / processes: no
    accumulation). Gradient accumulation steps = batch_size / (processes * micro_batch_size).
    `precision`: "auto" (bf16 on CUDA, fp32 on CPU where bf16 is slow), "fp32" or "bf16".
    `max_bad_steps`: a NaN/Inf loss skips the step; this many in a row stop the run.
    `objective`: what the run optimizes (train.objective): "cellpose" (flows), "distill" (a student from a
    teacher, section `kd`), "binary" / "binary_distill" (cell / background U-Nets, section `binary`).
    `host_mmap_threshold_mb`: on a CPU device, glibc serves allocations of at least this many MiB made during
    the forward pass with mmap, so the activations return to the OS as the backward pass frees them; the backward
    pass uses the heap (train.host_memory). 0 = glibc's dynamic threshold, which keeps freed activation memory
    resident. With optim.step_in_backward it lowers a CP-SAM ViT-L step's peak RSS at some cost in time
    (docs/results/training.md). "auto" (default): 1 for models of 50 M parameters or more (CP-SAM ViT), 0 for
    smaller ones (CPnet, students, U-Nets: there the page faults cost more than the memory saved). Ignored on CUDA.
    """

    objective: str = "cellpose"
    host_mmap_threshold_mb: str = "auto"

    output_dir: str = "runs/train"
    seed: int = 0
    resume: bool = True
    batch_size: int = 8
    micro_batch_size: int | None = None
    precision: str = "auto"
    max_bad_steps: int = 5
    max_steps: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    binary: BinaryConfig = field(default_factory=BinaryConfig)


def _structured() -> DictConfig:
    return OmegaConf.structured(TrainConfig)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file `path` (optional) <- `key=value` overrides; returns a validated TrainConfig.

    Raises ConfigError naming the file or key for an unknown key, a wrong type or a bad value.
    """
    base = _structured()
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"{p}: config file does not exist")
            try:
                loaded = OmegaConf.load(p)
            except Exception as exc:  # noqa: BLE001 - YAML errors become one clear message
                raise ConfigError(f"{p}: not a readable YAML config ({exc})") from exc
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{p}: a config must be a YAML mapping, got {type(loaded).__name__}")
            base = OmegaConf.merge(base, loaded)
        base = _merge_overrides(base, overrides)
        cfg: TrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{str(exc).splitlines()[0]}") from exc
    validate(cfg)
    return cfg


def _merge_overrides(base: DictConfig, overrides: list[str] | None) -> DictConfig:
    if not overrides:
        return base
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    return OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]


def apply_overrides(cfg: TrainConfig, overrides: list[str] | None) -> TrainConfig:
    """`cfg` with `key=value` overrides (OmegaConf dotlist) applied on top; validated. Raises ConfigError."""
    try:
        base = _merge_overrides(OmegaConf.structured(cfg), overrides)
        out: TrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    validate(out)
    return out


def _threshold_ok(setting: str) -> bool:
    """True when `host_mmap_threshold_mb` is "auto" or a number of MiB in [0, 32]."""
    try:
        parse_threshold(setting)
    except ValueError:
        return False
    return True


def validate(cfg: TrainConfig) -> None:
    """Check values that types cannot express; raises ConfigError naming the key."""
    checks = [
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.micro_batch_size is None or cfg.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
        (cfg.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
        (_threshold_ok(cfg.host_mmap_threshold_mb), "host_mmap_threshold_mb must be auto or a number of MiB in "
                                                     "[0, 32] (glibc's maximum)"),
        (cfg.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"max_steps must be >= 1 (or null: the schedule's length), "
                                                      f"got {cfg.max_steps}"),
        (cfg.optim.lr >= 0, "optim.lr must be >= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (normalize_setting(cfg.optim.step_in_backward) is not None, "optim.step_in_backward must be auto, on or off"),
        (cfg.schedule.epochs >= 1, "schedule.epochs must be >= 1"),
        (cfg.schedule.samples_per_epoch >= 1, "schedule.samples_per_epoch must be >= 1"),
        (cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1"),
        (cfg.val.every_epochs >= 0, "val.every_epochs must be >= 0"),
        (cfg.val.diameter in ("auto", "true", "model"), "val.diameter must be auto, true or model"),
        (cfg.val.mask_rules in ("", "cp3", "cp4"), "val.mask_rules must be empty (the model's own), cp3 or cp4"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.min_train_masks >= 0, "data.min_train_masks must be >= 0"),
    ]
    for key, size in (("model.tile_size", cfg.model.tile_size), ("data.tile_size", cfg.data.tile_size)):
        problem = None if size is None else size_problem(size, *TILE_SIZE_LIMITS)
        checks.append((problem is None, f"{key} {problem}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what `config.yaml` in a run folder holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain nested dicts/lists (for comparison and trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flat_keys(cfg: TrainConfig | None = None) -> list[tuple[str, Any]]:
    """Every config key in dotted form with its value (defaults when `cfg` is None), in declaration order."""
    tree = to_container(cfg if cfg is not None else TrainConfig())

    def walk(prefix: str, node: Any) -> list[tuple[str, Any]]:
        if isinstance(node, dict):
            out: list[tuple[str, Any]] = []
            for k, v in node.items():
                out += walk(f"{prefix}.{k}" if prefix else str(k), v)
            return out
        return [(prefix, node)]

    return walk("", tree)


def dataset_entries(entries: list[Any] | ListConfig) -> tuple[list[str], list[float] | None]:
    """Split `data.train` entries into folders and explicit weights (None when no entry gives one).

    Raises ConfigError when only some entries give a weight or an entry has no path.
    """
    paths: list[str] = []
    weights: list[float | None] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (str, os.PathLike)):
            paths.append(str(entry))
            weights.append(None)
        elif isinstance(entry, (dict, DictConfig)) and "path" in entry:
            paths.append(str(entry["path"]))
            weights.append(float(entry["weight"]) if entry.get("weight") is not None else None)
        else:
            raise ConfigError(f"data entry {i} must be a folder or {{path: DIR, weight: W}}, got {entry!r}")
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise ConfigError("give a weight for every data.train entry or for none (then data.weights applies)")
    return paths, ([float(w) for w in weights] if all(given) and weights else None)  # type: ignore[arg-type]


def preset(name: str) -> TrainConfig:
    """The two data-pipeline presets: "paper" (CP-SAM pre-training) and "finetune" (cellpose train_seg).

    paper: 0.25-4x log2 scale after bringing cells to 30 px, the paper's intensity augmentations,
    degradations on 50 % of samples, AdamW 5e-5 / 0.1 with the paper's schedule, layer drop 0.4.
    finetune: cellpose 4 fine-tuning defaults: scale 0.75-1.25, no intensity augmentation or
    degradation, AdamW 1e-5 / 0.1, batch 1, 100 epochs with train_seg's schedule.
    """
    if name == "paper":
        return TrainConfig(
            batch_size=256,
            model=ModelConfig(name="cpsam_vit_l", layer_drop=0.4),
            augment=AugmentConfig.paper(),
            degrade=DegradeConfig(fraction=0.5),
            optim=OptimConfig(lr=5e-5, weight_decay=0.1),
            schedule=ScheduleConfig(kind="paper", epochs=2000),
        )
    if name == "finetune":
        return TrainConfig(
            batch_size=1,
            model=ModelConfig(name="cpsam_vit_l"),
            augment=AugmentConfig.finetune(),
            degrade=DegradeConfig(fraction=0.0),
            optim=OptimConfig(lr=1e-5, weight_decay=0.1),
            schedule=ScheduleConfig(kind="cellpose", epochs=100),
        )
    raise ConfigError(f"unknown preset {name!r}; known presets: paper, finetune")
