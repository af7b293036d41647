"""The binary family's workflows behind `cpsam binary`: train, distill, predict, compare, explore.

train:   labelled images (any layout of train.binary.data) -> RUN/data -> RUN/init.pt (the architecture, with a
         local ImageNet encoder file or random weights) -> `train.loop.train` with objective "binary" -> RUN/model.pt,
         RUN/history.csv, RUN/history.png.
distill: a trained binary teacher + images without masks -> RUN2/data (the images, unannotated: one whole-image
         region stands in for each mask file) -> a student trained with objective "binary_distill" on the
         teacher's soft targets (computed online), validated on the teacher's validation images.
predict: NAME_masks.tif (connected components, uint16/uint32) and NAME_prob.tif (float32 cell probability).
compare: several runs (or configs trained first) scored on the same images: one table, one figure.
explore: a grid of augmented training samples with their loading codes applied (the training preview's panels).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cpsam import io
from cpsam.models import create_model
from cpsam.models.loading import read_checkpoint, save_checkpoint
from cpsam.models.unet import ENCODERS, load_encoder_weights
from data_prep.canonical import CanonicalDataset, read_index, to_chw, write_example, write_index
from train.augment import AugmentConfig
from train.binary.data import (
    BinaryData,
    find_binary_data,
    image_name,
    list_images,
    prepare_binary_data,
    read_binary_labels,
)
from train.binary.loading_codes import parse_loading_code
from train.binary.objective import BinaryDataset
from train.binary.predict import cell_probability, load_binary_model, predict_probabilities, probability_to_masks
from train.binary.report import EvalImage, plot_history, score_model, write_comparison, write_history
from train.config import TrainConfig, dataset_entries, load_config
from train.data import PipelineSpec, SampleKey
from train.degrade import DegradeConfig
from train.finetune import FinetuneError, apply_user_overrides, find_labelled_images
from train.loop import train
from train.preview import sample_panels
from train.run_folder import claim_run_folder
from train.sampler import MultiDatasetSampler
from train.schedule import ScheduleConfig

BINARY_MODELS = ("resnet34_unet", "resnet18_unet", "resnet10t_unet")


@dataclass
class BinaryRun:
    """A finished `cpsam binary train` / `distill`: the run folder, its files, the final validation metrics."""

    run: Path
    model_path: Path
    history: Path
    plot: Path
    steps: int
    seconds: float
    metrics: dict[str, float]


def binary_config(run: Path, data: BinaryData, model_name: str, init: Path, seed: int, overrides: Sequence[str] = (),
                  *, objective: str = "binary", loading_code: str = "", teacher: str = "",
                  temperature: float = 1.0) -> TrainConfig:
    """The default binary run: native scale (scale 0.75-1.25, no diameter rescaling), rotation and flips, no
    intensity jitter or degradation; batch 8, AdamW lr 3e-4 / wd 0.01, 30 epochs of 80 samples (300 steps) with a
    1-epoch warm-up and the last 5 (2) epochs at lr / 10 (/ 100); validation every 5 epochs; then `overrides`.
    The loading code and teacher are set as values (a code such as "0,1" must not go through YAML parsing)."""
    cfg = TrainConfig(objective=objective, batch_size=8, seed=int(seed), output_dir=str(run))
    cfg.binary.loading_code, cfg.binary.teacher, cfg.binary.temperature = loading_code, teacher, float(temperature)
    cfg.model.name = model_name
    cfg.model.init = str(init)
    cfg.augment = AugmentConfig(scale_mode="range", scale_range=0.5, rescale_to_diam_mean=False, intensity=False)
    cfg.degrade = DegradeConfig(fraction=0.0)
    cfg.optim.lr, cfg.optim.weight_decay = 3e-4, 0.01  # 1e-3 trained a from-scratch resnet34_unet far worse
    cfg.schedule = ScheduleConfig(kind="paper", epochs=30, samples_per_epoch=80, warmup_epochs=1, decay1_epochs=5,
                                  decay2_epochs=2)
    cfg.data.train = [str(r) for r in data.train_roots]
    cfg.data.val = [str(r) for r in data.val_roots]
    cfg.data.train_split, cfg.data.val_split = data.train_split, data.val_split
    cfg.data.min_train_masks = 1
    cfg.data.check_pixels = True
    cfg.val.every_epochs = 5
    cfg.checkpoint.every_steps = 50
    return apply_user_overrides(cfg, overrides)


def _hub_weights(encoder: str) -> Path | None:
    """A torchvision ImageNet file of `encoder` already in torch's hub cache (e.g. resnet34-b627a593.pth), if any."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{encoder}-*.pth")) if folder.is_dir() else []
    return found[0] if found else None


def make_init(path: Path, model_name: str, in_chans: int, seed: int, encoder_weights: str | None = None,
              decoder_div: int | None = None) -> Path:
    """Write the run's starting weights (our checkpoint format) to `path`: `model_name` with `in_chans` inputs and
    2 classes, random (seeded) weights, the encoder from a local ImageNet file when one is given or in torch's hub
    cache; says on stderr which. Raises FinetuneError for an unknown model or an unusable weight file."""
    if model_name not in ENCODERS:
        raise FinetuneError(f"--model {model_name!r} is not a binary model; choose one of {', '.join(BINARY_MODELS)}")
    torch.manual_seed(seed)
    kwargs = {} if decoder_div is None else {"decoder_div": int(decoder_div)}
    net = create_model(model_name, in_chans=int(in_chans), num_classes=2, **kwargs)
    weights = Path(encoder_weights) if encoder_weights else _hub_weights(ENCODERS[model_name])
    if weights is None:
        print(f"cpsam binary: {model_name} starts from random weights (no local ImageNet file of "
              f"{ENCODERS[model_name]}; give one with --encoder-weights FILE)", file=sys.stderr)
    else:
        try:
            load_encoder_weights(net, weights)
        except (ValueError, OSError) as exc:
            raise FinetuneError(f"--encoder-weights: {exc}") from exc
        print(f"cpsam binary: {model_name} encoder initialised from {weights} (ImageNet, first layer adapted to "
              f"{in_chans} channels)", file=sys.stderr)
    return save_checkpoint(path, net, imagenet=str(weights or ""))


def _finish(run: Path, cfg: TrainConfig, seconds: float, result) -> BinaryRun:
    history, plot = write_history(run), plot_history(run)
    return BinaryRun(run, run / "model.pt", history, plot, int(result.step), seconds, dict(result.final_metrics))


def _in_channels(code_text: str, source_channels: int) -> int:
    if not code_text.strip():
        return max(1, int(source_channels))
    try:
        return parse_loading_code(code_text).n_outputs
    except ValueError as exc:
        raise FinetuneError(str(exc)) from exc


def train_binary(images: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 masks: str | os.PathLike[str] | None = None, model_name: str = "resnet34_unet",
                 loading_code: str = "", init: str | None = None, encoder_weights: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0, overrides: Sequence[str] = (),
                 progress: bool = True) -> BinaryRun:
    """`cpsam binary train` (module docstring). `init`: start from a trained binary model instead of RUN/init.pt.
    Raises FinetuneError (bad data, model or override), ConfigError and train.loop.TrainingError."""
    start = time.perf_counter()
    run = Path(out)
    binary_config(run, BinaryData([], []), model_name, run / "init.pt", seed, overrides)  # bad overrides: before writes
    found = find_binary_data(images, masks)  # too few labelled images: refused before the run folder is made
    claim_run_folder(run, "binary train", {
        "images": Path(images), "masks": None if masks is None else Path(masks), "model": model_name,
        "loading_code": loading_code, "init": None if not init else Path(init),
        "encoder_weights": None if not encoder_weights else Path(encoder_weights), "val_fraction": val_fraction,
        "seed": seed})
    data = prepare_binary_data(found, None, run, val_fraction=val_fraction, seed=seed, progress=progress)
    for skipped in data.skipped:
        print(f"cpsam binary: {skipped}", file=sys.stderr)
    for problem in data.problems:
        print(f"cpsam binary: left out {problem}", file=sys.stderr)
    print(f"cpsam binary: {data.n_train} training and {data.n_val} validation images ({data.layout} layout)",
          file=sys.stderr)
    if init:
        start_from = Path(init) / "model.pt" if Path(init).is_dir() else Path(init)
    else:
        start_from = run / "init.pt"
        if not start_from.is_file():
            make_init(start_from, model_name, _in_channels(loading_code, data.source_channels), seed, encoder_weights)
    cfg = binary_config(run, data, model_name, start_from, seed, overrides, loading_code=loading_code)
    result = train(cfg)
    return _finish(run, cfg, time.perf_counter() - start, result)


def build_distill_data(images: str | os.PathLike[str], run: Path, *,
                       progress: bool = True) -> tuple[Path, int, list[str]]:
    """RUN/data for distillation: every image of `images` (labels beside them are ignored), unannotated.

    The canonical format needs a mask file per image: each holds ONE region covering the whole image (dataset
    "unlabelled" in index.csv), which `binary_distill` never reads (its targets are the teacher's soft outputs,
    computed online); no teacher pass over the images is spent on pseudo-labels.
    Returns (the dataset folder, images written, 'FILE: problem' lines).
    """
    root = run / "data"
    done = {r.name: r for r in read_index(root)}
    rows, problems = [], []
    for path in tqdm(list_images(images), desc="unlabelled data", disable=not progress, leave=False):
        name = image_name(path)
        if name in done and (root / "masks" / f"{name}.tif").is_file():
            rows.append(done[name])
            continue
        try:
            image = to_chw(io.read_image(path), path=path)
            region = np.ones(image.shape[-2:], np.uint16)
            rows.append(write_example(root, name, image, region, dataset="unlabelled", split="train",
                                      license="yours", source=str(path)))
        except (io.InputFileError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    write_index(root, rows)
    return root, len(rows), problems


def binary_teacher(path: Path) -> tuple[dict, int]:
    """(the training config, the input channels) of a binary teacher file. Raises FinetuneError naming --teacher
    when the file cannot be read or holds no binary model (a flow model: no cell / background classes)."""
    try:
        saved = read_checkpoint(path)
        kwargs = dict(saved.get("model_kwargs") or {}) if isinstance(saved, dict) else {}
        cfg = dict(saved.get("config") or {}) if isinstance(saved, dict) else {}
    except ValueError as exc:
        raise FinetuneError(f"--teacher: {exc}") from exc
    name = saved.get("model_name") if isinstance(saved, dict) else None
    if name not in ENCODERS or "in_chans" not in kwargs or int(kwargs.get("num_classes", 2)) != 2:
        raise FinetuneError(f"--teacher {path} is not a binary model ({name or 'unknown kind'}); give a model of "
                            f"`cpsam binary train` ({', '.join(BINARY_MODELS)})")
    return cfg, int(kwargs["in_chans"])


def distill_binary(teacher: str | os.PathLike[str], images: str | os.PathLike[str], student: str,
                   out: str | os.PathLike[str], *, temperature: float = 1.0, val: str | None = None, seed: int = 0,
                   overrides: Sequence[str] = (), progress: bool = True) -> BinaryRun:
    """`cpsam binary distill` (module docstring). `val`: canonical dataset(s) to validate on (default: the
    teacher's validation data). Raises FinetuneError, ConfigError and train.loop.TrainingError."""
    start = time.perf_counter()
    run = Path(out)
    teacher_path = Path(teacher) / "model.pt" if Path(teacher).is_dir() else Path(teacher)
    teacher_cfg, in_chans = binary_teacher(teacher_path)
    if not Path(images).is_dir():
        raise FinetuneError(f"--images {images}: no such folder")
    binary_config(run, BinaryData([], []), student, run / "init.pt", seed, overrides,  # bad overrides: before writes
                  objective="binary_distill", teacher=str(teacher_path), temperature=temperature)
    claim_run_folder(run, "binary distill", {
        "teacher": teacher_path, "images": Path(images), "student": student, "temperature": float(temperature),
        "val": None if not val else Path(val), "seed": seed})
    root, n, problems = build_distill_data(images, run, progress=progress)
    for problem in problems:
        print(f"cpsam binary distill: left out {problem}", file=sys.stderr)
    if n == 0:
        raise FinetuneError(f"no readable image in {images}")
    code_text = str((teacher_cfg.get("binary") or {}).get("loading_code", ""))
    teacher_data = teacher_cfg.get("data") or {}
    val_roots = [Path(val)] if val else [Path(p) for p in teacher_data.get("val") or [] if isinstance(p, str)]
    data = BinaryData([root], val_roots, train_split=None, val_split=None if val else teacher_data.get("val_split"),
                      layout="distill", n_train=n)
    start_from = run / "init.pt"
    if not start_from.is_file():
        make_init(start_from, student, in_chans, seed)
    cfg = binary_config(run, data, student, start_from, seed, overrides, objective="binary_distill",
                        loading_code=code_text, teacher=str(teacher_path), temperature=temperature)
    result = train(cfg)
    return _finish(run, cfg, time.perf_counter() - start, result)


def predict_folder(model: str | os.PathLike[str], images: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   threshold: float = 0.5, min_size: int = 0, tile: int | None = None,
                   device: str | torch.device = "cpu", progress: bool = True) -> tuple[list[Path], list[str]]:
    """Write OUT/NAME_masks.tif and OUT/NAME_prob.tif for every image of `images` (both or neither, atomically).
    Returns (paths written, 'FILE: problem' of the images that failed)."""
    net, code = load_binary_model(model, device)
    folder = io.check_output_dir(out)
    written, problems = [], []
    for path in tqdm(list_images(images), desc="predict", disable=not progress, leave=False):
        try:
            prob = cell_probability(predict_probabilities(net, to_chw(io.read_image(path), path=path), code,
                                                          tile=tile, device=device))
        except (io.InputFileError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        masks = probability_to_masks(prob, threshold, min_size)
        name = image_name(path)
        targets = [folder / f"{name}_masks.tif", folder / f"{name}_prob.tif"]
        with io.atomic_paths(targets) as (tmp_masks, tmp_prob):
            io.write_labels(tmp_masks, masks)
            io.write_tiff(tmp_prob, prob.astype(np.float32))
        written += targets
    return written, problems


def comparison_images(images: str | os.PathLike[str] | None, masks: str | os.PathLike[str] | None,
                      first_run: Path) -> list:
    """The images `compare` scores: `images` (any labelled layout; every image of it) or, by default, the
    validation images of the first run's config (its data.val rows of val_split). Returns EvalImage items."""
    if images is not None:
        found, _ = find_labelled_images(images, masks)
        return [EvalImage(item.name, io.read_image(item.image), read_binary_labels(item.labels)) for item in found]
    model_path = first_run / "model.pt" if first_run.is_dir() else first_run
    data = dict(read_checkpoint(model_path).get("config") or {}).get("data") or {}
    roots = [p for p in data.get("val") or [] if isinstance(p, str)]
    if not roots:
        raise FinetuneError(f"{model_path} records no validation data; give --images DIR (and --masks DIR)")
    ds = CanonicalDataset(roots, split=data.get("val_split"))
    return [EvalImage(row.name, ds.image(i), ds.mask(i)) for i, row in enumerate(ds)]


def compare_runs(runs: Sequence[str], out: str | os.PathLike[str], *, images: str | None = None,
                 masks: str | None = None, device: str | torch.device = "cpu") -> list[Path]:
    """`cpsam binary compare`: runs are run folders, model files or YAML configs (trained first, through the loop);
    all are scored on the same images (`comparison_images`). Returns the table and figure paths."""
    paths = []
    for item in runs:
        p = Path(item)
        if p.suffix in (".yaml", ".yml"):
            cfg = load_config(p)
            train(cfg)
            p = Path(cfg.output_dir)
        paths.append(p)
    evaluation = comparison_images(images, masks, paths[0])
    if not evaluation:
        raise FinetuneError("no image to compare the runs on")
    return write_comparison([score_model(p, evaluation, device=device) for p in paths], out)


def explore(images: str | os.PathLike[str], out: str | os.PathLike[str], *, masks: str | None = None,
            loading_code: str = "", n: int = 16, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """`cpsam binary explore`: the first `n` augmented training samples of epoch 0 with the loading code applied;
    per sample the training preview's panel (input + mask outlines, `train.preview.sample_panels`), its right
    half replaced by the binary target, captioned with what each input channel received. Writes a PNG grid."""
    if n < 1:
        raise FinetuneError(f"--n must be >= 1, got {n}")
    with tempfile.TemporaryDirectory(prefix="cpsam_explore_") as work:
        data = prepare_binary_data(images, masks, Path(work), val_fraction=0.0, seed=seed, progress=False)
        cfg = binary_config(Path(work), data, "resnet34_unet", Path(work) / "unused.pt", seed, overrides,
                            loading_code=loading_code)
        try:
            code = parse_loading_code(loading_code, _in_channels(loading_code, data.source_channels))
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
        paths, weights = dataset_entries(cfg.data.train)
        sampler = MultiDatasetSampler(paths, weights if weights is not None else cfg.data.weights,
                                      samples_per_epoch=n, seed=cfg.seed, split=cfg.data.train_split,
                                      min_train_masks=cfg.data.min_train_masks)
        tile = int(cfg.data.tile_size or 256)
        dataset = BinaryDataset(sampler, PipelineSpec(tile, code.n_outputs, cfg.augment, cfg.degrade), cfg.seed, 0,
                                code)
        panels = []
        for key in sampler.iter_positions():
            sample, told = dataset.sample_with_code(SampleKey(0, key.position, key.dataset_index, key.example_index))
            panel = sample_panels({**sample, "target": torch.zeros(3, tile, tile)},
                                  f"{key.position}: [{','.join(told)}] {key.name[:16]}")
            panel[-tile:, tile:] = (sample["target"].numpy()[..., None] * 255).astype(np.uint8)
            panels.append(panel)
    columns = max(1, math.ceil(math.sqrt(len(panels) / 2)))
    blank = np.full_like(panels[0], 40)
    rows = [np.concatenate(panels[r:r + columns] + [blank] * (columns - len(panels[r:r + columns])), axis=1)
            for r in range(0, len(panels), columns)]
    return io.write_png(out, np.concatenate(rows, axis=0))
