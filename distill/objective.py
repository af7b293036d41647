"""The distillation objective ("distill"): a student trained from a teacher through the one training loop.

    cfg = train.config.load_config(None, ["objective=distill", "kd.teacher=[cyto_0]", "model.name=cpnet", ...])
    train.loop.train(cfg)                     # the loop finds it by its entry point (cpsam.objectives: distill)

Per micro-batch (section `kd` of the config, train.config.KDConfig):
- data: the pipeline's crop in the teacher's channels (online), or one of the example's cached views with its
  stored targets (kd.cache; distill/data.py). In cache mode the crops are the cache's: augment.* / degrade.* /
  data.tile_size must equal the cache's (ConfigError otherwise: the cache cannot replay other augmentations);
- `prepare_batch` (device, no_grad): online, the frozen teacher runs on the crop; then the student's input is the
  crop's first `student.in_channels` channels, flat-field corrected / brightness-scaled when asked
  (distill/student_input.py);
- `loss`: distill.losses.kd_loss (alpha * feature + beta * (flow + cellprob)) on the student's output and its
  adapted feature map (distill/student.py picks the map; the adapter is an aux module, trained and checkpointed
  by the loop), plus kd.gt_weight * the Cellpose loss against the dataset's masks (ground truth, or the
  teacher's own masks for teacher-labelled data);
- validation: the loop's AP on data.val (against the teacher's masks for teacher-labelled data) plus
  `val_kd_loss`, the seed's "map loss" (flow + cellprob terms) on kd.val_crops fixed crops per validation image
  (the teacher's outputs on them are computed once and kept in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from distill.cache import CacheError, TeacherCache, view_sampler
from distill.data import CachedDistillDataset, OnlineDistillDataset, stack_crops
from distill.losses import FEATURE_LOSSES, FeatureAdapter, cellprob_kd_loss, flow_kd_loss, kd_loss
from distill.student import match_student_feature, student_feature_shapes, student_forward
from distill.student_input import student_view
from distill.teacher_init import freeze_copied_batchnorms, init_from_teacher
from distill.teachers import FEATURE_NAMES, Teacher, load_teacher
from train.config import ConfigError, KDConfig, TrainConfig, dataset_entries
from train.data import PipelineSpec, SampleKey, TrainDataset
from train.loss import cellpose_loss_terms
from train.objective import Objective, register_objective

KD_TERMS = ("kd_feature", "kd_flow", "kd_cellprob")
GT_TERMS = ("gt_flow", "gt_cellprob")


def adapter_seed(seed: int) -> int:
    """torch's seed for the feature adapter's initialisation (independent of what was built before it)."""
    return (int(seed) * 7_919 + 104_723) % 2**62


def check_kd(kd: KDConfig) -> None:
    """ConfigError naming the first kd.* key whose value cannot describe a run."""
    checks = [
        (kd.loss in FEATURE_LOSSES, f"kd.loss must be one of {', '.join(FEATURE_LOSSES)}, got {kd.loss!r}"),
        (kd.features in ("auto", "none", *FEATURE_NAMES),
         f"kd.features must be auto, none or one of {', '.join(FEATURE_NAMES)}, got {kd.features!r}"),
        (kd.alpha >= 0 and kd.beta >= 0, "kd.alpha and kd.beta must be >= 0"),
        (kd.temperature > 0, "kd.temperature must be > 0"),
        (kd.gt_weight >= 0, "kd.gt_weight must be >= 0"),
        (kd.flat_field_sigma > 0, "kd.flat_field_sigma must be > 0 (px)"),
        (kd.brightness == 0 or kd.brightness > kd.brightness_min >= 0,
         "kd.brightness (the largest factor) must be 0 (off) or above kd.brightness_min >= 0"),
        (0 <= kd.brightness_p <= 1, "kd.brightness_p must be a probability in [0, 1]"),
        (kd.val_crops >= 0, "kd.val_crops must be >= 0"),
        (0 < kd.student_scale <= 1, f"kd.student_scale must be in (0, 1], got {kd.student_scale}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def student_tile(tile: int, scale: float) -> int:
    """The student's crop size (px) for a teacher crop of `tile` px at kd.student_scale `scale`."""
    return max(1, int(round(tile * scale)))


def to_student_scale(x: Tensor, size: int, nearest: bool = False) -> Tensor:
    """(B, C, T, T) -> (B, C, size, size) float: area averaging (the mean of the teacher pixels each student pixel
    covers: flows stay unit-length-scaled directions, logits their local mean), or nearest for masks. Identity
    when the size already fits."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if nearest:
        return torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area")


def _pipeline_differences(run: PipelineSpec, cached: PipelineSpec) -> list[str]:
    diff = [f"data.tile_size: {run.tile_size} (cache {cached.tile_size})"] if run.tile_size != cached.tile_size else []
    for section, mine, theirs in (("augment", asdict(run.augment), asdict(cached.augment)),
                                  ("degrade", asdict(run.degrade), asdict(cached.degrade))):
        diff += [f"{section}.{k}: {mine[k]!r} (cache {theirs[k]!r})" for k in mine if mine[k] != theirs[k]]
    return diff


@register_objective("distill")
class DistillObjective(Objective):
    """Student <- teacher (module docstring). Raises ConfigError for bad kd.* values or a cache that does not fit."""

    name = "distill"
    best_metric = "val_ap50"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        kd = cfg.kd
        check_kd(kd)
        try:
            self.cache = TeacherCache(kd.cache) if kd.cache else None
        except CacheError as exc:
            raise ConfigError(f"kd.cache: {exc}") from exc
        self.teacher_specs = list(kd.teacher) or (list(self.cache.teacher["specs"]) if self.cache else [])
        if self.cache is not None and kd.teacher_augment and not self.cache.teacher_augment:
            raise ConfigError(f"kd.teacher_augment=true, but kd.cache={kd.cache} holds the plain teacher's targets; "
                              "rebuild it with `cpsam distill cache --teacher-augment`, or drop the option")
        self.teacher_augment = bool(kd.teacher_augment or (self.cache is not None and self.cache.teacher_augment))
        if not self.teacher_specs:
            raise ConfigError("kd.teacher is empty: name the teacher (a pretrained name such as cyto_0, a model file "
                              "or a run folder), e.g. kd.teacher=[cyto_0]")
        self.term_names = KD_TERMS + (GT_TERMS if kd.gt_weight > 0 else ())
        self._teacher: Teacher | None = None
        self._teacher_device: torch.device | None = None
        self.spec: PipelineSpec | None = None
        self.teacher_feature: str | None = None
        self.teacher_feature_shape: tuple[int, int, int] | None = None
        self.student_map: str | None = None
        self.student_channels: int | None = None
        self._val_batches: list[dict[str, Tensor]] | None = None

    # ----------------------------------------------------------------- teacher
    def teacher(self, device: torch.device | None = None) -> Teacher:
        """The frozen teacher (loaded on first use), on `device` when given."""
        if self._teacher is None:
            try:
                self._teacher = load_teacher(self.teacher_specs, augment=self.teacher_augment)
            except ValueError as exc:
                raise ConfigError(f"kd.teacher: {exc}") from exc
        if device is not None and self._teacher_device != device:
            self._teacher.to(device)
            self._teacher_device = device
        return self._teacher

    def _choose_feature(self, available: dict[str, tuple[int, int, int]], default: str) -> None:
        kd = self.cfg.kd
        if kd.features == "none" or kd.alpha == 0:
            return
        name = default if kd.features == "auto" else kd.features
        if name not in available:
            where = f"the cache {kd.cache}" if self.cache else f"teacher {self.teacher_specs}"
            raise ConfigError(f"kd.features={kd.features}: {where} has no feature map {name!r} (it has "
                              f"{', '.join(available) or 'none'}); use kd.features=none or rebuild the cache")
        self.teacher_feature, self.teacher_feature_shape = name, tuple(available[name])  # type: ignore[assignment]

    # ----------------------------------------------------------------- data
    def _check_student_scale(self, teacher_diam_mean: float) -> None:
        """ConfigError when kd.student_scale != 1 and model.diam_mean is not the teacher's times it (the student
        would then be run at a scale it was not trained at)."""
        scale = self.cfg.kd.student_scale
        if scale == 1 or teacher_diam_mean <= 0:
            return
        want = teacher_diam_mean * scale
        have = self.cfg.model.diam_mean
        if have is None or abs(float(have) - want) > 1e-6 * want:
            raise ConfigError(f"kd.student_scale={scale}: model.diam_mean must be {want:g} (the teacher's "
                              f"{teacher_diam_mean:g} x {scale}), got {have}; `cpsam distill` sets it")

    @property
    def student_size(self) -> int:
        """The student's crop size (px): the teacher's crop times kd.student_scale."""
        if self.spec is None:
            raise RuntimeError("the objective's dataset() has not run yet")
        return student_tile(self.spec.tile_size, self.cfg.kd.student_scale)

    def dataset(self, sampler, spec: PipelineSpec, seed: int, cache_mb: int) -> torch.utils.data.Dataset:
        """Online: the pipeline's crops in the teacher's channels; cached: the cache's views (module docstring)."""
        if self.cache is not None:
            try:
                self.cache.check_examples(sampler)
            except CacheError as exc:
                raise ConfigError(f"kd.cache: {exc}") from exc
            cached = self.cache.pipeline_spec()
            diff = _pipeline_differences(spec, cached)
            if diff:
                raise ConfigError(f"kd.cache: the cached views fix the crops, so the pipeline cannot differ from the "
                                  f"cache's ({'; '.join(diff[:6])}); set these keys to the cache's values (see "
                                  f"{self.cache.root / 'manifest.json'}) or train online (kd.cache='')")
            self.spec = cached
            self._check_student_scale(float(self.cache.teacher.get("diam_mean", 0.0)))
            features = self.cache.features
            self._choose_feature(features, next(iter(features), "decoder"))
            base = TrainDataset(sampler, cached, self.cache.seed, cache_mb)
            return CachedDistillDataset(base, self.cache, self.cfg.kd, seed, self.teacher_feature)
        teacher = self.teacher()
        if teacher.kind == "cpsam" and spec.tile_size != teacher.tile_size:
            raise ConfigError(f"data.tile_size={spec.tile_size}: the CP-SAM teacher takes {teacher.tile_size}-px "
                              f"crops only; set data.tile_size={teacher.tile_size}")
        self.spec = replace(spec, channels=max(spec.channels, teacher.in_channels))
        self._check_student_scale(teacher.diam_mean)
        self._choose_feature(teacher.feature_shapes(self.spec.tile_size), teacher.default_feature)
        return OnlineDistillDataset(TrainDataset(sampler, self.spec, seed, cache_mb), self.cfg.kd, seed)

    def initialize(self, net: nn.Module, fresh: bool = True) -> str | None:
        """kd.init_from_teacher: a fresh student starts from the teacher's weights where they fit
        (distill.teacher_init); with kd.freeze_copied_bn those layers' BatchNorms keep the teacher's statistics
        (re-applied to a resumed student, which then is not copied over). One teacher only (an ensemble has no
        single set of weights)."""
        kd = self.cfg.kd
        if not kd.init_from_teacher:
            return None
        teacher = self.teacher()
        if len(teacher.members) != 1:
            raise ConfigError(f"kd.init_from_teacher needs one teacher, not an ensemble of {len(teacher.members)}")
        try:
            report = init_from_teacher(net, teacher.members[0].net, load=fresh)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        frozen = freeze_copied_batchnorms(net, report) if kd.freeze_copied_bn else []
        note = report.summary() if fresh else "kd.init_from_teacher: resumed student (weights from its checkpoint)"
        return note + (f"; {len(frozen)} BatchNorms keep the teacher's statistics" if frozen else "")

    def aux_modules(self, net: nn.Module) -> nn.ModuleDict:
        """{"adapter": FeatureAdapter} from the student's matched map to the teacher's (none without feature term)."""
        self.student_channels = int(net.in_channels)
        if self.teacher_feature is None or self.spec is None:
            return nn.ModuleDict()
        tile = self.student_size
        shapes = student_feature_shapes(net, tile, self.student_channels)
        try:
            self.student_map = match_student_feature(shapes, self.teacher_feature_shape, tile)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"kd.features={self.cfg.kd.features}: {exc}") from exc
        with torch.random.fork_rng(devices=[]):  # its initialisation: a function of the run's seed alone
            torch.manual_seed(adapter_seed(self.cfg.seed))
            adapter = FeatureAdapter(shapes[self.student_map], self.teacher_feature_shape)  # type: ignore[arg-type]
        return nn.ModuleDict({"adapter": adapter})

    def student_input(self, image: Tensor, brightness: Tensor | None = None) -> Tensor:
        """The student's view (B, student channels, T, T) float32 of a (B, C, T, T) teacher crop."""
        kd = self.cfg.kd
        return student_view(image, int(self.student_channels or image.shape[1]), flat_field=kd.flat_field,
                            sigma=kd.flat_field_sigma, brightness=brightness)

    def prepare_batch(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Online: the teacher's targets t_output (B, 3, T, T) and t_feature; always: student_image."""
        if self.cache is None:
            taught = self.teacher(device).teach(batch["image"], [self.teacher_feature] if self.teacher_feature else [])
            batch["t_output"] = taught.output
            if self.teacher_feature:
                batch["t_feature"] = taught.features[self.teacher_feature]
        batch["student_image"] = self.student_input(batch["image"], batch.get("brightness"))
        if self.cfg.kd.student_scale != 1:
            self._scale_targets(batch)
        return batch

    def _scale_targets(self, batch: dict[str, Tensor]) -> None:
        """kd.student_scale: the student's input and every pixel target at the student's size (t_feature keeps the
        teacher's; the adapter resizes the student's map to it)."""
        size = self.student_size
        for name in ("student_image", "t_output", "target"):
            if name in batch:
                batch[name] = to_student_scale(batch[name], size)
        if "valid" in batch:
            valid = batch["valid"]
            squeeze = valid.ndim == 3
            valid = to_student_scale(valid[:, None] if squeeze else valid, size, nearest=True)
            batch["valid"] = valid[:, 0] if squeeze else valid

    # ----------------------------------------------------------------- loss
    def loss(self, net: nn.Module, aux: nn.ModuleDict, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """KD loss (+ kd.gt_weight x Cellpose loss on the dataset's masks) and its named terms (0-d float32)."""
        kd = self.cfg.kd
        feature = self.student_map if self.teacher_feature else None
        output, fmap = student_forward(net, batch["student_image"], feature)
        s_feat = aux["adapter"](fmap) if fmap is not None else None
        terms = kd_loss(output, batch["t_output"], s_feat, batch["t_feature"] if s_feat is not None else None,
                        alpha=kd.alpha, beta=kd.beta, temperature=kd.temperature, feature_kind=kd.loss)
        parts = {"kd_feature": terms.feature, "kd_flow": terms.flow, "kd_cellprob": terms.cellprob}
        total = terms.loss
        if kd.gt_weight > 0:
            gt = cellpose_loss_terms(output, batch["target"], batch.get("valid"))
            total = total + kd.gt_weight * gt.loss
            parts.update(gt_flow=gt.flow, gt_cellprob=gt.cellprob)
        return total, parts

    # ----------------------------------------------------------------- validation
    def inference_record(self, net: nn.Module) -> dict[str, Any]:
        """The base record (mask rules: the teacher's, set in val.mask_rules by `cpsam distill`) with the channels
        [SEG, NUC] the teacher's data were made with (kd.channels)."""
        record = super().inference_record(net)
        record["channels"] = list(self.cfg.kd.channels) if self.cfg.kd.channels is not None else None
        return record

    def val_columns(self, dataset_names: Sequence[str]) -> list[str]:
        """The loop's AP columns plus val_kd_loss."""
        return [*super().val_columns(dataset_names), "val_kd_loss"]

    def _val_crops(self, device: torch.device) -> list[dict[str, Tensor]]:
        """Batches of kd.val_crops fixed crops per validation image with the teacher's outputs (CPU, memoized)."""
        if self._val_batches is not None:
            return self._val_batches
        cfg = self.cfg
        roots = dataset_entries(cfg.data.val)[0] if cfg.data.val else []
        self._val_batches = []
        if not roots or self.spec is None:
            return self._val_batches
        sampler = view_sampler(roots, cfg.data.val_split)
        data = TrainDataset(sampler, self.spec, cfg.seed, cache_mb=128)
        examples = [(d, i) for d, ds in enumerate(sampler.datasets) for i in range(len(ds))]
        keys = [SampleKey(n, ordinal, d, i) for n in range(cfg.kd.val_crops) for ordinal, (d, i) in enumerate(examples)]
        teacher = self.teacher(device)
        for b in range(0, len(keys), 8):
            batch = stack_crops(data, keys[b: b + 8])
            batch["t_output"] = teacher.teach(batch["image"].to(device), []).output.cpu()
            self._val_batches.append({k: batch[k] for k in ("image", "t_output")})
        return self._val_batches

    def val_kd_loss(self, net: nn.Module, rank: int, world: int, reduce_sum: Callable[[Tensor], Tensor],
                    device: torch.device | None = None) -> float:
        """Mean over the fixed validation crops of kd.beta x (flow + cellprob) KD terms: the seed's map loss."""
        device = device or next(net.parameters()).device
        batches = self._val_crops(device)
        sums = torch.zeros(2, dtype=torch.float64)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            for batch in batches[rank::world]:
                size = self.student_size
                out = net(to_student_scale(self.student_input(batch["image"].to(device)), size))[0]
                target = to_student_scale(batch["t_output"].to(device), size)
                n = out.shape[0]
                loss = flow_kd_loss(out, target) + cellprob_kd_loss(out, target, self.cfg.kd.temperature)
                sums += torch.tensor([float(loss) * n * self.cfg.kd.beta, n], dtype=torch.float64)
        net.train(was_training)
        sums = reduce_sum(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def validate(self, net: nn.Module, images: Sequence[Any], n_datasets: int, rank: int, world: int,
                 reduce_sum: Callable[[Tensor], Tensor], **kwargs: Any) -> dict[str, float]:
        """The loop's AP validation plus val_kd_loss (when kd.val_crops > 0)."""
        out = super().validate(net, images, n_datasets, rank, world, reduce_sum, **kwargs)
        if self.cfg.kd.val_crops > 0:
            out["val_kd_loss"] = self.val_kd_loss(net, rank, world, reduce_sum, kwargs.get("device"))
        return out

