"""The one training loop (CP-SAM, classic CPnet, distillation students, binary U-Nets), on accelerate.

    cfg = train.config.load_config("scripts/configs/tiny_cpu.yaml", ["output_dir=runs/x"])
    result = train.loop.train(cfg)

The same code runs as one CPU process, or on N GPUs / M nodes under `accelerate launch` or
`torchrun` (accelerate places tensors and wraps the model in DDP). What it does differently from
accelerate's own examples, and why:

- Data order: our `MultiDatasetSampler` owns (seed, epoch, cursor) and is sharded per rank in
  blocks of one micro-batch, so a step's global batch is the same set of samples whatever the
  number of processes; the DataLoader is NOT passed to `accelerator.prepare` (accelerate's
  mid-epoch resume replays the wrong samples: accelerate #2016, #3242, verified in
  ../shared/research/training_anchors.md §5).
- Randomness: every sample's draws come from (seed, epoch, position) (train.data); the model's own
  randomness (layer drop) from torch's RNG, re-seeded from (seed, step, rank) before every step,
  so a resumed run continues exactly (and every rank's RNG state is saved in the checkpoint too).
- Gradient accumulation with explicit `no_sync` on all but the last micro-batch; the loss of each
  micro-batch is divided by the number of micro-batches, so the step's gradient is the mean over
  the global batch (DDP averages over ranks).
- Learning rate set per step from `train.schedule` (a pure function of the step: nothing to resume).
- Checkpoints: the whole state in one file written atomically by rank 0 (train.checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from train import checkpoint as ckpt
from train import optim_in_backward
from train.augment import MIN_DIAMETER
from train.config import ConfigError, OptimConfig, TrainConfig, dataset_entries, flat_keys, to_container, to_yaml
from train.data import KeySampler, PipelineSpec, find_bad_examples, make_loader
from train.host_memory import (
    AUTO_THRESHOLD_MB,
    HEAP_THRESHOLD_MB,
    forward_allocations,
    forward_threshold_mb,
    parse_threshold,
    set_mmap_threshold,
)
from train.logs import MetricsCSV, columns, plot_curves
from train.model_init import build_model, enable_activation_checkpointing
from train.objective import Objective, StepModule, objective_for
from train.sampler import MultiDatasetSampler
from train.schedule import lr_at_step

# keys whose change does not change what a run computes (a rerun may differ in them)
_FREE_KEYS = {"resume", "output_dir", "max_steps", "data.num_workers", "data.cache_mb", "val.batch_size",
              "log.every_steps", "log.tensorboard", "log.progress", "log.sample_keys", "host_mmap_threshold_mb",
              "optim.step_in_backward"}


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    output_dir: Path
    step: int
    epoch: int
    interrupted: int = 0  # the signal number that stopped the run, 0 when it finished
    best_ap50: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    is_main: bool = True  # False on the other ranks of a multi-process run (they print nothing)


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with `optim`'s settings; the fused kernel on CPU and CUDA (one pass over each parameter, no
    temporaries: 5x faster than the default per-tensor-list step on a CPU, measured on 20 x 1M floats, equal to
    2.4e-7), the default implementation elsewhere."""
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused or None)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """torch's seed before step `step` on rank `rank`: a pure function of the three."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % 2**62


def runs_on_cpu() -> bool:
    """True when this process should run on the CPU: no CUDA device, or ACCELERATE_USE_CPU set. Pass it as
    `cpu=` to accelerate's Accelerator / PartialState: without it, processes started by torchrun on a machine
    without a GPU each run as rank 0 of a world of 1 (gloo is only set up for an explicit CPU request)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this run: CPU (gloo) when no GPU, bf16 autocast on CUDA when precision is auto."""
    from accelerate import Accelerator

    cuda = not runs_on_cpu()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    log_with = None
    if cfg.log.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    return Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=log_with,
        project_dir=cfg.output_dir,
    )


def _config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                        defaults: dict[str, Any] | None = None) -> list[str]:
    """Keys whose value changed between a saved config and the new one. A key the saved config lacks (a run
    written before the key existed) counts as changed only when the new value is not the key's default."""
    if defaults is None:
        defaults = to_container(TrainConfig())
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        default = defaults.get(key, "<absent>") if isinstance(defaults, dict) else "<absent>"
        if a == "<absent>" and b == default:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{name}.", default if isinstance(default, dict) else {})
        elif a != b and name not in _FREE_KEYS:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def prepare_run_folder(cfg: TrainConfig) -> dict[str, Any] | None:
    """Rank 0: check or create the run folder; returns the state to resume from (None = fresh start).

    A used folder with a different config is refused (TrainingError listing the keys); `resume=false`
    wipes the previous run's checkpoints and logs first.
    """
    run = Path(cfg.output_dir)
    if run.exists() and not run.is_dir():
        raise TrainingError(f"output_dir {run} exists and is not a folder")
    run.mkdir(parents=True, exist_ok=True)
    if not os.access(run, os.W_OK):
        raise TrainingError(f"output_dir {run} is not writable")
    saved = run / "config.yaml"
    state = None
    if saved.is_file() and cfg.resume:
        try:
            old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        except Exception as exc:  # noqa: BLE001 - a damaged config.yaml gets one clear message
            raise TrainingError(f"{saved} cannot be read ({exc}); fix it, or resume=false to start over") from exc
        diff = _config_differences(old, to_container(cfg))  # type: ignore[arg-type]
        if diff:
            raise TrainingError(
                f"{run} holds a run with another config ({'; '.join(diff[:6])}); use another output_dir, "
                "or resume=false to start over in this folder"
            )
        state = ckpt.load_state(ckpt.last_dir(run))
    if state is None:
        for name in ("checkpoints", "tensorboard", "samples"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in ("metrics.csv", "model.pt", "curves.png"):
            (run / name).unlink(missing_ok=True)
    from cpsam.io import atomic_path

    with atomic_path(saved) as tmp:
        tmp.write_text(to_yaml(cfg))
    return state


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _broadcast(accelerator, obj: Any) -> Any:
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(cfg: TrainConfig, objective: Objective | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; see the module docstring.

    `objective`: what the run optimizes (train.objective); None = the one the config key `objective` names.
    """
    if objective is None:
        objective = objective_for(cfg)
    accelerator = make_accelerator(cfg)
    on_cpu = accelerator.device.type == "cpu"
    mmap_setting = parse_threshold(cfg.host_mmap_threshold_mb)  # None: auto, decided once the model is built
    if on_cpu:  # the model, its state and the optimizer state are mmapped, outside the heap (train.host_memory)
        set_mmap_threshold(AUTO_THRESHOLD_MB if mmap_setting is None else mmap_setting)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise ConfigError(
            f"batch_size {cfg.batch_size} (global) must be a multiple of processes ({world}) x micro_batch_size "
            f"({cfg.micro_batch_size or 'auto'})"
        )
    accum = cfg.batch_size // (world * micro)
    run = Path(cfg.output_dir)

    error, state = None, None
    if main:
        try:
            state = prepare_run_folder(cfg)
        except (TrainingError, ValueError) as exc:
            error = str(exc)
    error = _broadcast(accelerator, error)
    if error:
        raise TrainingError(error)
    accelerator.wait_for_everyone()
    if not main:
        state = ckpt.load_state(ckpt.last_dir(run)) if cfg.resume else None

    torch.manual_seed(cfg.seed)  # random initialisation is a function of the seed (same on every rank)
    net = build_model(cfg.model)
    forward_mmap_mb = forward_threshold_mb(cfg.host_mmap_threshold_mb, sum(p.numel() for p in net.parameters())) \
        if on_cpu else 0.0
    if on_cpu and mmap_setting is None and forward_mmap_mb == 0:
        set_mmap_threshold(HEAP_THRESHOLD_MB)  # a small model: the heap serves everything (no page faults)
    if cfg.model.activation_checkpointing and not enable_activation_checkpointing(net):
        accelerator.print("model.activation_checkpointing: not supported for this model; ignored")
    channels = int(cfg.data.channels or net.in_channels)
    tile = int(cfg.data.tile_size or net.tile_size)

    paths, weights = dataset_entries(cfg.data.train)
    if not paths:
        raise ConfigError("data.train is empty: give at least one canonical dataset folder")
    bad = find_bad_examples(paths, cfg.data.train_split, cfg.data.check_pixels) if main else None
    bad = _broadcast(accelerator, bad)
    if main:
        for b in bad:
            print(f"left out {b.path}: {b.reason}", file=sys.stderr)
    samples = int(math.ceil(cfg.schedule.samples_per_epoch / cfg.batch_size) * cfg.batch_size)
    if samples != cfg.schedule.samples_per_epoch and main:
        print(f"schedule.samples_per_epoch {cfg.schedule.samples_per_epoch} rounded up to {samples} "
              f"(a multiple of batch_size {cfg.batch_size})", file=sys.stderr)
    sampler = MultiDatasetSampler(
        paths, weights if weights is not None else cfg.data.weights, samples_per_epoch=samples, seed=cfg.seed,
        rank=rank, world_size=world, split=cfg.data.train_split, min_train_masks=cfg.data.min_train_masks,
        block_size=micro, exclude=[(b.dataset_index, b.name, b.reason) for b in bad],
    )
    if main:
        print(f"train: world size {world}, global batch {cfg.batch_size} = {world} x micro-batch {micro} x "
              f"{accum} accumulation steps, device {accelerator.device}, {accelerator.mixed_precision} precision",
              file=sys.stderr)
        print(sampler.summary_line(), file=sys.stderr)
    if cfg.augment.rescale_to_diam_mean and hasattr(net, "diam_labels"):
        # cellpose's train_seg: the model's own diameter (the default at inference) is the mean training
        # diameter, so that a model trained on rescaled images rescales new images of the same kind
        diameters = [max(float(row.median_diameter), MIN_DIAMETER) for row in sampler.used_rows()]
        if diameters:
            with torch.no_grad():
                net.diam_labels.fill_(math.fsum(diameters) / len(diameters))
    dataset = objective.dataset(sampler, PipelineSpec(tile, channels, cfg.augment, cfg.degrade), cfg.seed,
                                cfg.data.cache_mb)
    steps_per_epoch = samples // cfg.batch_size
    total_steps = cfg.schedule.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))

    step, best_ap, best_step, skipped = 0, None, None, 0
    note = objective.initialize(net, fresh=state is None)  # a resumed run loads its checkpoint over it below
    if note and main:
        print(note, file=sys.stderr)
    aux = objective.aux_modules(net)
    net.to(accelerator.device)
    aux.to(accelerator.device)
    params = [p for p in (*net.parameters(), *aux.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim, accelerator.device)
    if state is not None:
        net.load_state_dict(state["model"])
        aux.load_state_dict(state.get("aux", {}))
        optimizer.load_state_dict(state["optimizer"])
        step, best_ap, best_step, skipped = state["step"], state["best_ap50"], state["best_step"], state["skipped"]
        # the data order is a function of the step, not of the number of processes: a run may resume on
        # another number of GPUs; only a change of the training data itself is refused
        if state["sampler"]["fingerprint"] != sampler.fingerprint:
            raise TrainingError(
                f"{ckpt.last_dir(run)} was written with other training data (examples or weights changed); "
                "use the same data, or resume=false"
            )
        ckpt.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if main:
            print(f"resuming {run} from step {step} (epoch {step // steps_per_epoch})", file=sys.stderr)
    if cfg.model.sync_batchnorm and world > 1 and accelerator.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place below the top module
    step_module = StepModule(net, aux, objective, run_net=torch.compile(net) if cfg.model.compile else None)
    model, optimizer = accelerator.prepare(step_module, optimizer)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    blocked = optim_in_backward.blockers(world_size=world, accumulation_steps=accum, grad_clip=cfg.optim.grad_clip,
                                         loss_scaler=getattr(accelerator, "scaler", None) is not None)
    try:
        fuse_step = optim_in_backward.wanted(cfg.optim.step_in_backward, accelerator.device, blocked)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    in_backward = optim_in_backward.StepInBackward(inner_optimizer) if fuse_step else None
    if main and in_backward is not None:
        print("train: the optimizer steps each parameter inside the backward pass (optim.step_in_backward)",
              file=sys.stderr)

    val_roots = [str(p) for p in dataset_entries(cfg.data.val)[0]] if cfg.data.val else []
    val_images = objective.list_val_images(val_roots, cfg.data.val_split, cfg.val.max_images) if val_roots else []
    val_names = [Path(p).name for p in val_roots]
    use_true_diameter = cfg.val.diameter == "true" or (cfg.val.diameter == "auto" and cfg.augment.rescale_to_diam_mean)
    term_names = tuple(objective.term_names)
    header = columns(val_names, term_names, objective.val_columns(val_names))
    metrics = MetricsCSV(run / "metrics.csv", header, step) if main else None
    if main and accelerator.trackers == [] and cfg.log.tensorboard and accelerator.log_with:
        accelerator.init_trackers("tensorboard", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                         for k, v in flat_keys(cfg)})

    def save(last_metrics: dict[str, float], improved: bool) -> None:
        rngs = [ckpt.rng_state()]
        if world > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if not main:
            return
        payload = {
            "model": ckpt.cpu_state_dict(net), "aux": ckpt.cpu_state_dict(aux), "objective": objective.name,
            "optimizer": optimizer.state_dict(), "step": step,
            "epoch": step // steps_per_epoch,
            "sampler": {**sampler.state_dict(), "epoch": step // steps_per_epoch,
                        "cursor": (step % steps_per_epoch) * micro * accum},
            "rng": rngs, "best_ap50": best_ap, "best_step": best_step, "skipped": skipped,
            "config": to_container(cfg), "world_size": world, "metrics": last_metrics,
        }
        try:
            path = ckpt.save_state(ckpt.last_dir(run), payload)
            from cpsam.models.loading import save_checkpoint

            save_checkpoint(run / "model.pt", net, step=step, epoch=step // steps_per_epoch, config=to_container(cfg),
                            metrics=last_metrics, inference=objective.inference_record(net))
            if improved:
                ckpt.copy_atomic(path, ckpt.best_dir(run) / ckpt.STATE_FILE)
                ckpt.copy_atomic(run / "model.pt", ckpt.best_dir(run) / "model.pt")
        except OSError as exc:  # disk full / read-only: the previous checkpoint is intact (atomic writes)
            print(f"warning: checkpoint at step {step} not written ({exc}); the previous one is intact",
                  file=sys.stderr)

    keys_log = None
    if cfg.log.sample_keys:
        (run / "samples").mkdir(exist_ok=True)
        keys_log = open(run / "samples" / f"rank{rank}.csv", "a")  # noqa: SIM115 - closed at the end

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t.to(device), reduction="sum").cpu() if world > 1 else t

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (main and cfg.log.progress), desc="train",
               dynamic_ncols=True)
    device = accelerator.device
    t_start, consecutive_bad, last_val = time.perf_counter(), 0, {}
    # one loader (and one set of workers with their caches) for every remaining epoch of the run
    keys = KeySampler(sampler, start_epoch=step // steps_per_epoch,
                      start_cursor=(step % steps_per_epoch) * micro * accum,
                      end_epoch=math.ceil(total_steps / steps_per_epoch))
    batches = iter(make_loader(dataset, micro, cfg.data.num_workers, pin_memory=device.type == "cuda", keys=keys))
    # the hooks come off when the run ends, however it ends (the model may be trained again in this process)
    with _StopFlag() as stop, in_backward or contextlib.nullcontext():
        while step < total_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            while step < total_steps and step // steps_per_epoch == epoch:
                t0 = time.perf_counter()
                lr = lr_at_step(cfg.schedule, cfg.optim.lr, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(_step_seed(cfg.seed, step, rank))
                totals = torch.zeros(1 + len(term_names), dtype=torch.float64)
                for k in range(accum):
                    batch = next(batches)
                    if keys_log is not None:
                        for e, p, d, i in zip(batch["epoch"].tolist(), batch["position"].tolist(),
                                              batch["dataset_index"].tolist(), batch["example_index"].tolist(),
                                              strict=True):
                            keys_log.write(f"{step},{e},{p},{d},{i}\n")
                        keys_log.flush()
                    batch = _to_device(batch, device)
                    with torch.no_grad(), accelerator.autocast():
                        batch = objective.prepare_batch(batch, device)
                    sync = contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(model)
                    with sync, accelerator.autocast():
                        # the first step keeps the threshold through its backward pass, where AdamW creates its state
                        with forward_allocations(forward_mmap_mb, keep_after=not inner_optimizer.state):
                            out = model(batch)
                        values = torch.tensor([float(out[n].detach()) for n in ("loss", *term_names)],
                                              dtype=torch.float64)
                        # with the step fused into the backward pass, a NaN/Inf loss must not reach it
                        if in_backward is None or torch.isfinite(values).all():
                            accelerator.backward(out["loss"] / accum)
                    totals += values / accum
                # agree on skipping across ranks: a NaN on any rank poisons the all-reduced gradient
                flags = torch.tensor([0.0 if torch.isfinite(totals).all() else 1.0, float(stop.signum)], device=device)
                if world > 1:
                    flags = accelerator.reduce(flags, reduction="sum")
                grad_norm = float("nan")
                if flags[0] > 0:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    consecutive_bad += 1
                    if consecutive_bad >= cfg.max_bad_steps:
                        bar.close()
                        raise TrainingError(
                            f"{consecutive_bad} steps in a row had a NaN/Inf loss (last at step {step}); the run "
                            f"stopped and its last good checkpoint in {ckpt.last_dir(run)} is intact; lower optim.lr "
                            "or check the data"
                        )
                else:
                    consecutive_bad = 0
                    if in_backward is None:  # else every parameter was stepped inside the backward pass
                        if cfg.optim.grad_clip > 0:
                            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.optim.grad_clip))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_mean = totals.clone()
                if world > 1:
                    loss_mean = accelerator.reduce(loss_mean.to(device), reduction="mean").cpu()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_mean[0]):.4f}", lr=f"{lr:.2e}", epoch=epoch)
                row = {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss_mean[0]),
                       **{n: float(v) for n, v in zip(term_names, loss_mean[1:].tolist(), strict=True)},
                       "grad_norm": grad_norm,
                       "samples_per_s": cfg.batch_size / max(time.perf_counter() - t0, 1e-9),
                       "skipped_steps": skipped, "seconds": time.perf_counter() - t_start}
                if main and (step % cfg.log.every_steps == 0 or step == total_steps):
                    metrics.write(row)
                    if accelerator.log_with:
                        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                epoch_done = step % steps_per_epoch == 0 or step == total_steps
                improved = False
                if epoch_done and val_images and _due(cfg, epoch, step == total_steps):
                    last_val = objective.validate(
                        net, val_images, len(val_roots), rank, world, reduce_sum,
                        channels=channels, use_true_diameter=use_true_diameter, batch_size=cfg.val.batch_size,
                        niter=cfg.val.niter, flow_threshold=cfg.val.flow_threshold,
                        cellprob_threshold=cfg.val.cellprob_threshold, mask_rules=cfg.val.mask_rules, device=device,
                        dataset_names=val_names, progress=cfg.log.progress,
                    )
                    net.train()
                    best_key = objective.best_metric
                    if last_val and best_key in last_val and (best_ap is None or last_val[best_key] > best_ap):
                        best_ap, best_step, improved = last_val[best_key], step, True
                    if main:
                        metrics.write({"step": step, "epoch": epoch, **last_val})
                        if accelerator.log_with:
                            accelerator.log({k.replace("/", "_"): v for k, v in last_val.items()}, step=step)
                        bar.write(f"step {step} epoch {epoch}: " + ", ".join(
                            f"{k} {v:.3f}" for k, v in last_val.items() if not k.startswith("val_ap50/")))
                # never during a streak of NaN steps: if it ends the run, the last checkpoint predates it
                due_save = step % cfg.checkpoint.every_steps == 0 or step == total_steps or improved or flags[1] > 0
                if due_save and consecutive_bad == 0:
                    save(last_val, improved)
                if flags[1] > 0:
                    del batches
                    bar.close()
                    signum = int(stop.signum) or signal.SIGTERM
                    if main:
                        print(f"stopped by signal {signum} at step {step}; checkpoint written to {ckpt.last_dir(run)}; "
                              "rerun the same command to resume", file=sys.stderr)
                    accelerator.end_training()
                    return TrainResult(run, step, step // steps_per_epoch, int(signum), best_ap, last_val, skipped,
                                       main)
    del batches
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        plot_curves(run / "metrics.csv", run / "curves.png")
    accelerator.end_training()
    return TrainResult(run, step, step // steps_per_epoch, 0, best_ap, last_val, skipped, main)


def _due(cfg: TrainConfig, epoch: int, last: bool) -> bool:
    """Validate after epoch `epoch` (0-based) every `val.every_epochs` epochs, and at the end of the run."""
    every = cfg.val.every_epochs
    return every > 0 and ((epoch + 1) % every == 0 or last)
