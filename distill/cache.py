"""The teacher-output cache: K augmented views per training image, each stored as its sample key + fp16 targets.

    CACHE/manifest.json                 what fixes the views: teacher, teacher_augment (flip-averaged targets, see
                                        distill.teachers), seed, K, crop size, channels, the augment and
                                        degrade configs, the datasets (+ split) and their example names
    CACHE/views/d{D}/{NAME}/v{K}.pt     one torch file per view: {"key": [seed, k, ordinal, D, I], "output": fp16
                                        (3, T, T) [dY, dX, cellprob logit], "features": {name: fp16 (C, h, w)}}
    CACHE/data/                         the teacher-labelled datasets, when the cache was built from raw images

View k of example I of dataset D is the training pipeline's sample (train.data.TrainDataset.make_sample) of the
key (epoch = k, position = the example's ordinal in the manifest): replayed from that key, never stored as
pixels (EdgeSAM / TinyViT's design, training_anchors.md section 4). Every file is written atomically (a killed
run leaves no partial file), existing files are skipped (resumable), and under `accelerate launch` each process
takes a disjoint share of the examples (ordinal % num_processes == process_index). `verify_cache` rebuilds views
from their keys, re-runs the teacher and reports the largest difference.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from cpsam.io import atomic_path
from distill.teachers import Teacher
from train.augment import AugmentConfig
from train.data import PipelineSpec, SampleKey, TrainDataset
from train.degrade import DegradeConfig
from train.loop import runs_on_cpu
from train.sampler import MultiDatasetSampler

CACHE_FORMAT = "cpsam-distill-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_VIEW_STREAM = 0xCA5E  # child stream that picks a sample's view: separate from the pipeline's streams


class CacheError(ValueError):
    """A cache that cannot be built, read or used as asked; the message names the file and the problem."""


def _resolved(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    return [str(Path(p).resolve()) for p in paths]


def fp16_tolerance(values: torch.Tensor) -> torch.Tensor:
    """Per element, how far a stored fp16 copy of `values` (float32) may be from a recomputation of them:
    fp16 rounding (11 significant bits: at most 2^-11 of the magnitude) plus float32 noise of a recomputation in
    another batch (other kernels: 1e-6 of the tensor's largest magnitude, which matters near 0 only)."""
    scale = max(1.0, float(values.abs().max())) if values.numel() else 1.0
    return values.abs() * 2.0**-11 + 1e-6 * scale


def pick_view(seed: int, epoch: int, position: int, views: int) -> int:
    """Which of an example's `views` cached views the training sample (seed, epoch, position) uses: a pure
    function of the three (uniform over 0..views-1)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(position),
                                                                        _VIEW_STREAM])))
    return int(rng.integers(views))


def view_sampler(datasets: Sequence[str | os.PathLike[str]], split: str | None) -> MultiDatasetSampler:
    """A sampler over the datasets used only for its example lookup (`TrainDataset` reads examples through it)."""
    return MultiDatasetSampler(list(datasets), "size", samples_per_epoch=1, split=split, min_train_masks=0)


@dataclass
class VerifyReport:
    """Largest |cached - recomputed| over the checked views (output and each feature), the largest difference
    relative to `fp16_tolerance` (<= 1: within fp16 precision), and how many views were checked."""

    n_views: int
    max_output_diff: float
    max_feature_diff: dict[str, float]
    max_ulp_ratio: float

    def line(self) -> str:
        """One human line."""
        feats = ", ".join(f"{k} {v:.3g}" for k, v in self.max_feature_diff.items())
        return (f"verified {self.n_views} cached views: max |cached - recomputed| output {self.max_output_diff:.3g}"
                + (f", features {feats}" if feats else "") + f"; {self.max_ulp_ratio:.2f} x fp16 precision")


class TeacherCache:
    """Read access to a built (or partly built) cache folder; raises CacheError when there is no manifest."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CacheError(f"{path}: no cache manifest (build the cache with `cpsam distill cache`)")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"{path}: unreadable cache manifest ({exc})") from exc
        if self.manifest.get("format") != CACHE_FORMAT or self.manifest.get("version") != CACHE_VERSION:
            raise CacheError(f"{path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest")
        self.examples: list[tuple[int, int, str]] = [tuple(e) for e in self.manifest["examples"]]  # type: ignore[misc]
        self._ordinal = {(d, i): n for n, (d, i, _) in enumerate(self.examples)}

    # ----------------------------------------------------------------- what fixes the views
    @property
    def seed(self) -> int:
        """The pipeline seed of the views."""
        return int(self.manifest["seed"])

    @property
    def views(self) -> int:
        """Views per example (K)."""
        return int(self.manifest["views"])

    @property
    def datasets(self) -> list[str]:
        """The canonical dataset folders (resolved), in data.train order."""
        return list(self.manifest["datasets"])

    @property
    def val_datasets(self) -> list[str]:
        """The canonical folders holding validation rows (data.val of a run on this cache)."""
        return list(self.manifest.get("val_datasets", []))

    @property
    def split(self) -> str | None:
        """The split of the cached examples (data.train_split)."""
        return self.manifest["split"]

    @property
    def features(self) -> dict[str, tuple[int, int, int]]:
        """{name: (C, h, w)} of the stored teacher feature maps."""
        return {k: tuple(v) for k, v in self.manifest["features"].items()}  # type: ignore[misc]

    @property
    def teacher_augment(self) -> bool:
        """Whether the stored targets are the flip-averaged teacher's (`--teacher-augment`; False for older caches)."""
        return bool(self.manifest.get("teacher_augment", False))

    @property
    def teacher(self) -> dict[str, Any]:
        """The teacher's description (Teacher.describe())."""
        return dict(self.manifest["teacher"])

    def pipeline_spec(self) -> PipelineSpec:
        """The PipelineSpec the views were made with (crop size, teacher channels, augment, degrade)."""
        m = self.manifest
        return PipelineSpec(int(m["tile_size"]), int(m["channels"]), AugmentConfig(**m["augment"]),
                            DegradeConfig(**m["degrade"]))

    # ----------------------------------------------------------------- views
    def ordinal(self, dataset_index: int, example_index: int) -> int:
        """The example's position in the manifest; CacheError when it is not cached."""
        try:
            return self._ordinal[(int(dataset_index), int(example_index))]
        except KeyError:
            raise CacheError(f"{self.root}: example {example_index} of dataset {dataset_index} is not in the "
                             "cache") from None

    def view_key(self, dataset_index: int, example_index: int, view: int) -> SampleKey:
        """The pipeline key that replays view `view` of the example."""
        return SampleKey(int(view), self.ordinal(dataset_index, example_index), int(dataset_index), int(example_index))

    def view_path(self, dataset_index: int, example_index: int, view: int) -> Path:
        """CACHE/views/d{D}/{NAME}/v{K}.pt."""
        name = self.examples[self.ordinal(dataset_index, example_index)][2]
        return self.root / "views" / f"d{int(dataset_index)}" / name / f"v{int(view)}.pt"

    def load_view(self, dataset_index: int, example_index: int, view: int) -> dict[str, Any]:
        """{"key": [...], "output": float32 (3, T, T), "features": {name: float32 (C, h, w)}} of one view."""
        path = self.view_path(dataset_index, example_index, view)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CacheError(f"{path}: cached view missing (finish the cache: rerun `cpsam distill cache`)") from None
        except Exception as exc:  # noqa: BLE001 - a damaged view gets one clear message
            raise CacheError(f"{path}: unreadable cached view ({type(exc).__name__}: {exc})") from exc
        return {"key": data["key"], "output": data["output"].float(),
                "features": {k: v.float() for k, v in data["features"].items()}}

    def all_views(self) -> list[tuple[int, int, int]]:
        """Every (dataset_index, example_index, view) of the manifest, in ordinal order."""
        return [(d, i, k) for d, i, _ in self.examples for k in range(self.views)]

    def views_of_rank(self, rank: int, world: int) -> list[tuple[int, int, int]]:
        """The views process `rank` of `world` computes: every view of the examples with ordinal % world == rank
        (disjoint images per process, all views of an image on one process)."""
        return [v for v in self.all_views() if self.ordinal(v[0], v[1]) % int(world) == int(rank)]

    def missing_views(self) -> list[tuple[int, int, int]]:
        """The views whose file is not there yet."""
        return [v for v in self.all_views() if not self.view_path(*v).is_file()]

    def check_examples(self, sampler: MultiDatasetSampler) -> None:
        """CacheError unless `sampler` reads the cache's datasets, split and example names (a run may use the
        cache only for the data it was built on)."""
        roots = _resolved(sampler.roots)
        if roots != self.datasets or sampler.split != self.split:
            raise CacheError(f"{self.root}: the cache was built for data.train={self.datasets} "
                             f"(split {self.split!r}), the run reads {roots} (split {sampler.split!r})")
        names = [(d, i, n) for d, ds in enumerate(sampler.datasets) for i, n in enumerate(ds.names)]
        if names != self.examples:
            raise CacheError(f"{self.root}: the datasets' examples changed since the cache was built; rebuild it")


def _manifest(teacher: Teacher, datasets: Sequence[str], val_datasets: Sequence[str], split: str | None,
              sampler: MultiDatasetSampler, spec: PipelineSpec, seed: int, views: int,
              features: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher": teacher.describe(),
        "teacher_augment": bool(teacher.augment),
        "features": {k: list(v) for k, v in features.items()}, "seed": int(seed), "views": int(views),
        "tile_size": int(spec.tile_size), "channels": int(spec.channels), "augment": asdict(spec.augment),
        "degrade": asdict(spec.degrade), "datasets": _resolved(datasets), "val_datasets": _resolved(val_datasets),
        "split": split,
        "examples": [[d, i, n] for d, ds in enumerate(sampler.datasets) for i, n in enumerate(ds.names)],
    }


def check_resume(out: str | os.PathLike[str], teacher_augment: bool) -> None:
    """Raise CacheError (one line) when `out` holds a cache built with the other --teacher-augment setting."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return
    built = TeacherCache(out).teacher_augment
    if built != teacher_augment:
        how = "with" if built else "without"
        raise CacheError(f"{path}: the cache there was built {how} --teacher-augment; rerun {how} it to resume, or "
                         "use another --out")


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.is_file():
        old = TeacherCache(out).manifest
        check_resume(out, bool(manifest["teacher_augment"]))
        old = {"teacher_augment": False, **old}  # caches from before the option: a plain teacher
        if old != manifest:
            diff = [k for k in manifest if old.get(k) != manifest[k]]
            raise CacheError(f"{path}: the cache there was built with other settings ({', '.join(diff)}); use "
                             "another --out, or remove that folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def _save_view(path: Path, key: SampleKey, seed: int, output: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
    half = {"output": output.half().cpu().contiguous(), **{f"f:{k}": v.half().cpu().contiguous()
                                                            for k, v in features.items()}}
    bad = [k for k, v in half.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CacheError(f"{path}: teacher values of {bad[0].removeprefix('f:')} overflow fp16 (|x| > 65504)")
    payload = {"key": [int(seed), *(int(v) for v in key)], "output": half["output"],
               "features": {k: half[f"f:{k}"] for k in features}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


@dataclass
class BuildReport:
    """What `build_cache` did on this process: views written, views already there, seconds."""

    written: int
    skipped: int
    seconds: float


def build_cache(teacher: Teacher, datasets: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                spec: PipelineSpec, views: int = 4, seed: int = 0, split: str | None = "train",
                val_datasets: Sequence[str | os.PathLike[str]] = (), features: Sequence[str] | None = None,
                batch_size: int = 8, progress: bool = True) -> BuildReport:
    """Compute and store the teacher's output (+ `features`) for `views` views of every example (module docstring).

    datasets: canonical folders (data.train of the runs that will read the cache); split: their rows to cache;
    spec: the pipeline (crop size, channels >= the teacher's, augment, degrade); features: teacher feature
    names (None = the teacher's default map, [] = none). Shards over `accelerate` processes; every process
    returns its own BuildReport. Raises CacheError for settings that differ from an existing cache in `out`.
    """
    state = PartialState(cpu=runs_on_cpu())
    out = Path(out)
    if views < 1:
        raise CacheError(f"--views must be >= 1, got {views}")
    if spec.channels < teacher.in_channels:
        raise CacheError(f"the crops have {spec.channels} channels, the teacher reads {teacher.in_channels}")
    names = [teacher.default_feature] if features is None else list(features)
    shapes = teacher.feature_shapes(spec.tile_size)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise CacheError(f"teacher {teacher.spec} has no feature map {unknown[0]!r} (it has {', '.join(shapes)})")
    sampler = view_sampler(datasets, split)
    manifest = _manifest(teacher, [str(d) for d in datasets], [str(d) for d in val_datasets], split, sampler, spec,
                         seed, views, {n: shapes[n] for n in names})
    error = None
    if state.is_main_process:
        try:
            _write_manifest(out, manifest)
        except CacheError as exc:
            error = str(exc)
    state.wait_for_everyone()
    if error or not (out / MANIFEST).is_file():
        raise CacheError(error or f"{out / MANIFEST}: the main process could not write the manifest")
    cache = TeacherCache(out)
    mine = cache.views_of_rank(state.process_index, state.num_processes)
    todo = [v for v in mine if not cache.view_path(*v).is_file()]
    start = time.perf_counter()
    dataset = TrainDataset(sampler, spec, seed, cache_mb=256)
    teacher.to(state.device)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"teacher cache (rank {state.process_index})",
               unit="view", disable=not progress, file=sys.stderr)
    for b in range(0, len(todo), batch_size):
        chunk = todo[b: b + batch_size]
        keys = [cache.view_key(*v) for v in chunk]
        x = torch.stack([dataset.make_sample(k)["image"] for k in keys]).to(state.device)
        taught = teacher.teach(x, names)
        for j, v in enumerate(chunk):
            _save_view(cache.view_path(*v), keys[j], seed, taught.output[j],
                       {n: f[j] for n, f in taught.features.items()})
        bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    return BuildReport(len(todo), len(mine) - len(todo), time.perf_counter() - start)


def verify_cache(cache: TeacherCache, teacher: Teacher, n: int, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> VerifyReport:
    """Rebuild `n` cached views (spread evenly over the cache) from their keys, re-run `teacher` on them and
    compare with the stored targets. Raises CacheError when a view is missing."""
    views = cache.all_views()
    if n < 1 or not views:
        return VerifyReport(0, 0.0, {}, 0.0)
    picks = sorted({int(round(p)) for p in np.linspace(0, len(views) - 1, min(n, len(views)))})
    chosen = [views[p] for p in picks]
    sampler = view_sampler(cache.datasets, cache.split)
    cache.check_examples(sampler)
    dataset = TrainDataset(sampler, cache.pipeline_spec(), cache.seed, cache_mb=256)
    teacher.to(device)
    names = list(cache.features)
    max_out, max_feat, max_ratio = 0.0, dict.fromkeys(names, 0.0), 0.0
    for b in range(0, len(chosen), batch_size):
        chunk = chosen[b: b + batch_size]
        x = torch.stack([dataset.make_sample(cache.view_key(*v))["image"] for v in chunk]).to(device)
        fresh = teacher.teach(x, names)
        for j, v in enumerate(chunk):
            stored = cache.load_view(*v)
            pairs = [("output", stored["output"], fresh.output[j].cpu())]
            pairs += [(k, stored["features"][k], fresh.features[k][j].cpu()) for k in names]
            for name, old, new in pairs:
                diff = (old - new).abs()
                bound = fp16_tolerance(new)
                max_ratio = max(max_ratio, float((diff / bound).max()))
                if name == "output":
                    max_out = max(max_out, float(diff.max()))
                else:
                    max_feat[name] = max(max_feat[name], float(diff.max()))
    return VerifyReport(len(chosen), max_out, max_feat, max_ratio)
