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
import copy
import fcntl
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from cpsam.io import Terminated, atomic_path
from cpsam.models import create_model
from cpsam.models.loading import save_checkpoint
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


LOCK_FILE = ".lock"  # RUN/.lock: held (flock) by the one process that trains in RUN


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    output_dir: Path
    step: int
    epoch: int
    interrupted: int = 0  # the signal number that stopped the run (carried by RunStopped), 0 when it finished
    best_ap50: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    is_main: bool = True  # False on the other ranks of a multi-process run (they print nothing)


class RunStopped(Terminated):
    """A stop signal (SIGTERM, SIGINT) ended the run after its checkpoint: `train` raises it instead of returning,
    so no workflow carries on after a stop (no size model, no scores, no report rows). A KeyboardInterrupt: a
    command ends with exit code 128 + `signum` (`cpsam.command`); `result` is where the run stopped."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__(result.interrupted)
        self.result = result


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with `optim`'s settings; the fused kernel on CPU and CUDA (one pass over each parameter, no
    temporaries; the same update as the default per-tensor-list step to float32 rounding), the default
    implementation elsewhere."""
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
    from accelerate import Accelerator  # when a run starts, not with train.loop (CLIs import it for TrainingError)

    cuda = not runs_on_cpu()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    log_with = None
    if cfg.log.tensorboard:
        try:
            import tensorboard  # noqa: F401 - an optional dependency, only probed

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
        state = ckpt.load_state(ckpt.last_dir(run))
        if diff and state is not None:  # a run that never checkpointed (it failed first) holds nothing to keep
            raise TrainingError(
                f"{run} holds a run with another config ({'; '.join(diff[:6])}); use another output_dir, "
                "or resume=false to start over in this folder"
            )
    if state is None:
        for name in ("checkpoints", "tensorboard", "samples"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in ("metrics.csv", "model.pt", "curves.png"):
            (run / name).unlink(missing_ok=True)
    with atomic_path(saved) as tmp:
        tmp.write_text(to_yaml(cfg))
    return state


def lock_run_folder(run: Path) -> Any:
    """Create the run folder if needed and take its lock (an exclusive `flock` on RUN/.lock, released by
    `unlock_run_folder` or by the kernel when the process dies); returns the open lock file. TrainingError when
    another process trains in the folder, or the folder cannot be used."""
    if run.exists() and not run.is_dir():
        raise TrainingError(f"output_dir {run} exists and is not a folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        handle = open(run / LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run, closed by unlock_run_folder
    except OSError as exc:
        raise TrainingError(f"output_dir {run} is not writable ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise TrainingError(f"output_dir {run} is in use by another run ({run / LOCK_FILE} is locked); wait for it "
                            "to end, or use another output_dir") from exc
    return handle


def unlock_run_folder(handle: Any) -> None:
    """Release a lock taken by `lock_run_folder` (also for the DataLoader workers that inherited it)."""
    if handle is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


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
    from accelerate.utils import broadcast_object_list  # accelerate loads only when a run starts (make_accelerator)

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(cfg: TrainConfig, objective: Objective | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; see the module docstring.

    `objective`: what the run optimizes (train.objective); None = the one the config key `objective` names.
    The steps, in order: `_Run.__init__` (accelerator, batch geometry), `open_folder` (the state to resume from),
    `build_network`, `build_data`, `build_optimizer` (and the resumed state), `open_logs`, then `loop`.
    A stop signal (SIGTERM, SIGINT) ends the run at the next step boundary with a checkpoint, then raises
    `RunStopped` (nothing else is written; the same call again resumes). Rank 0 holds the run folder's lock
    (`lock_run_folder`) from the start to the end, however the run ends.
    """
    if objective is None:
        objective = objective_for(cfg)
    run = _Run(cfg, objective)
    try:
        state = run.open_folder()
        run.build_network()
        run.build_data()
        run.build_optimizer(state)
        run.open_logs()
        return run.loop()
    finally:
        unlock_run_folder(run.lock)


class _Run:
    """One training run while it goes: the steps of `train`, each a method, and the state they share.

    Every rank builds the same objects in the same order (the network's random initialisation and the objective's
    modules draw from torch's RNG seeded with `cfg.seed`), so the order of the steps is part of the contract.
    """

    def __init__(self, cfg: TrainConfig, objective: Objective) -> None:
        """The accelerator, the CPU memory policy (train.host_memory) and the batch geometry: global batch =
        processes x micro-batch x accumulation steps. ConfigError when the batch does not divide."""
        self.cfg, self.objective = cfg, objective
        self.accelerator = accelerator = make_accelerator(cfg)
        self.device = accelerator.device
        self.on_cpu = self.device.type == "cpu"
        self.mmap_setting = parse_threshold(cfg.host_mmap_threshold_mb)  # None: auto, decided once the model is built
        # on a CPU the model, its state and the optimizer state are mmapped, outside the heap (train.host_memory)
        if self.on_cpu:
            set_mmap_threshold(AUTO_THRESHOLD_MB if self.mmap_setting is None else self.mmap_setting)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        micro = cfg.micro_batch_size or cfg.batch_size // self.world
        if micro < 1 or cfg.batch_size % (self.world * micro):
            raise ConfigError(
                f"batch_size {cfg.batch_size} (global) must be a multiple of processes ({self.world}) x "
                f"micro_batch_size ({cfg.micro_batch_size or 'auto'})"
            )
        self.micro, self.accum = micro, cfg.batch_size // (self.world * micro)
        self.run = Path(cfg.output_dir)
        self.lock: Any = None  # rank 0: the run folder's lock (lock_run_folder)
        self.saved_step: int | None = None  # the step of the checkpoint in checkpoints/last (None: none)
        self.unsaved_best: tuple[dict[str, Any], dict[str, Any]] | None = None  # (payload, model.pt extras) owed
        self.failed_save: tuple[int, str] | None = None  # rank 0: (step, why) when the latest save failed
        self.resumed_metrics: dict[str, float] = {}  # the validation metrics the resumed checkpoint recorded

    def open_folder(self) -> dict[str, Any] | None:
        """Rank 0 checks or creates the run folder (`prepare_run_folder`), the others wait; returns the state to
        resume from on every rank (None = fresh start). TrainingError on every rank when rank 0 refuses."""
        error, state = None, None
        if self.main:
            try:
                self.lock = lock_run_folder(self.run)
                state = prepare_run_folder(self.cfg)
            except (TrainingError, ValueError) as exc:
                error = str(exc)
        error = _broadcast(self.accelerator, error)
        if error:
            raise TrainingError(error)
        self.accelerator.wait_for_everyone()
        if not self.main:
            state = ckpt.load_state(ckpt.last_dir(self.run)) if self.cfg.resume else None
        return state

    def build_network(self) -> None:
        """The network (seeded initialisation, same on every rank), its forward-phase mmap threshold, activation
        checkpointing, and the input geometry (channels, tile) the data pipeline makes."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # random initialisation is a function of the seed (same on every rank)
        self.net = net = build_model(cfg.model)
        self.forward_mmap_mb = forward_threshold_mb(cfg.host_mmap_threshold_mb,
                                                    sum(p.numel() for p in net.parameters())) if self.on_cpu else 0.0
        if self.on_cpu and self.mmap_setting is None and self.forward_mmap_mb == 0:
            set_mmap_threshold(HEAP_THRESHOLD_MB)  # a small model: the heap serves everything (no page faults)
        if cfg.model.activation_checkpointing and not enable_activation_checkpointing(net):
            self.accelerator.print("model.activation_checkpointing: not supported for this model; ignored")
        self.channels = int(cfg.data.channels or net.in_channels)
        self.tile = int(cfg.data.tile_size or net.tile_size)

    def build_data(self) -> None:
        """The sampler (bad examples left out, sharded per rank in micro-batch blocks), the model's mean training
        diameter, the objective's dataset, and the run's length in steps."""
        cfg, main = self.cfg, self.main
        paths, weights = dataset_entries(cfg.data.train)
        if not paths:
            raise ConfigError("data.train is empty: give at least one canonical dataset folder")
        bad = find_bad_examples(paths, cfg.data.train_split, cfg.data.check_pixels) if main else None
        bad = _broadcast(self.accelerator, bad)
        if main:
            for b in bad:
                print(f"left out {b.path}: {b.reason}", file=sys.stderr)
        samples = int(math.ceil(cfg.schedule.samples_per_epoch / cfg.batch_size) * cfg.batch_size)
        if samples != cfg.schedule.samples_per_epoch and main:
            print(f"schedule.samples_per_epoch {cfg.schedule.samples_per_epoch} rounded up to {samples} "
                  f"(a multiple of batch_size {cfg.batch_size})", file=sys.stderr)
        self.sampler = sampler = MultiDatasetSampler(
            paths, weights if weights is not None else cfg.data.weights, samples_per_epoch=samples, seed=cfg.seed,
            rank=self.rank, world_size=self.world, split=cfg.data.train_split,
            min_train_masks=cfg.data.min_train_masks, block_size=self.micro,
            exclude=[(b.dataset_index, b.name, b.reason) for b in bad],
        )
        if main:
            print(f"train: world size {self.world}, global batch {cfg.batch_size} = {self.world} x micro-batch "
                  f"{self.micro} x {self.accum} accumulation steps, device {self.device}, "
                  f"{self.accelerator.mixed_precision} precision", file=sys.stderr)
            print(sampler.summary_line(), file=sys.stderr)
        if cfg.augment.rescale_to_diam_mean and hasattr(self.net, "diam_labels"):
            # cellpose's train_seg: the model's own diameter (the default at inference) is the mean training
            # diameter, so that a model trained on rescaled images rescales new images of the same kind
            diameters = [max(float(row.median_diameter), MIN_DIAMETER) for row in sampler.used_rows()]
            if diameters:
                with torch.no_grad():
                    self.net.diam_labels.fill_(math.fsum(diameters) / len(diameters))
        self.dataset = self.objective.dataset(sampler, PipelineSpec(self.tile, self.channels, cfg.augment,
                                                                    cfg.degrade), cfg.seed, cfg.data.cache_mb)
        self.steps_per_epoch = samples // cfg.batch_size
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, int(cfg.max_steps))

    def build_optimizer(self, state: dict[str, Any] | None) -> None:
        """The objective's initialisation and aux modules, the optimizer, the resumed state (weights, optimizer,
        counters, this rank's RNG), then accelerate's wrappers and the optimizer step fused into the backward pass
        where it may be. TrainingError when the resumed checkpoint was written with other training data."""
        cfg, objective, accelerator, net = self.cfg, self.objective, self.accelerator, self.net
        self.step, self.best_ap, self.best_step, self.skipped = 0, None, None, 0
        note = objective.initialize(net, fresh=state is None)  # a resumed run loads its checkpoint over it below
        if note and self.main:
            print(note, file=sys.stderr)
        self.aux = aux = objective.aux_modules(net)
        net.to(self.device)
        aux.to(self.device)
        self.params = [p for p in (*net.parameters(), *aux.parameters()) if p.requires_grad]
        optimizer = make_optimizer(self.params, cfg.optim, self.device)
        if state is not None:
            net.load_state_dict(state["model"])
            aux.load_state_dict(state.get("aux", {}))
            optimizer.load_state_dict(state["optimizer"])
            self.step, self.best_ap, self.best_step, self.skipped = (state["step"], state["best_ap50"],
                                                                     state["best_step"], state["skipped"])
            self.saved_step = self.step
            self.resumed_metrics = state.get("metrics") or {}
            # the data order is a function of the step, not of the number of processes: a run may resume on
            # another number of GPUs; only a change of the training data itself is refused
            if state["sampler"]["fingerprint"] != self.sampler.fingerprint:
                raise TrainingError(
                    f"{ckpt.last_dir(self.run)} was written with other training data (examples or weights "
                    "changed); use the same data, or resume=false"
                )
            ckpt.set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
            if self.main:
                print(f"resuming {self.run} from step {self.step} (epoch {self.step // self.steps_per_epoch})",
                      file=sys.stderr)
        if cfg.model.sync_batchnorm and self.world > 1 and self.device.type == "cuda":
            self.net = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place below the top module
        step_module = StepModule(net, aux, objective, run_net=torch.compile(net) if cfg.model.compile else None)
        self.model, self.optimizer = accelerator.prepare(step_module, optimizer)
        # accelerate's wrapper holds the torch optimizer
        self.inner_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        blocked = optim_in_backward.blockers(world_size=self.world, accumulation_steps=self.accum,
                                             grad_clip=cfg.optim.grad_clip,
                                             loss_scaler=getattr(accelerator, "scaler", None) is not None)
        try:
            fuse_step = optim_in_backward.wanted(cfg.optim.step_in_backward, self.device, blocked)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.in_backward = optim_in_backward.StepInBackward(self.inner_optimizer) if fuse_step else None
        if self.main and self.in_backward is not None:
            print("train: the optimizer steps each parameter inside the backward pass (optim.step_in_backward)",
                  file=sys.stderr)

    def open_logs(self) -> None:
        """The validation images, metrics.csv (rank 0), tensorboard, and the per-rank sample-key log."""
        cfg, objective, accelerator = self.cfg, self.objective, self.accelerator
        self.val_roots = [str(p) for p in dataset_entries(cfg.data.val)[0]] if cfg.data.val else []
        self.val_images = (objective.list_val_images(self.val_roots, cfg.data.val_split, cfg.val.max_images)
                           if self.val_roots else [])
        self.val_names = [Path(p).name for p in self.val_roots]
        self.use_true_diameter = cfg.val.diameter == "true" or (cfg.val.diameter == "auto"
                                                                and cfg.augment.rescale_to_diam_mean)
        self.term_names = tuple(objective.term_names)
        header = columns(self.val_names, self.term_names, objective.val_columns(self.val_names))
        self.metrics = MetricsCSV(self.run / "metrics.csv", header, self.step) if self.main else None
        if self.main and accelerator.trackers == [] and cfg.log.tensorboard and accelerator.log_with:
            accelerator.init_trackers("tensorboard", config={
                k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_keys(cfg)})
        self.keys_log = None
        if cfg.log.sample_keys:
            (self.run / "samples").mkdir(exist_ok=True)
            self.keys_log = open(self.run / "samples" / f"rank{self.rank}.csv", "a")  # noqa: SIM115 - closed at the end

    def loop(self) -> TrainResult:
        """Steps until the run's end or a stop signal: per step the update, then validation and a checkpoint when
        due. One loader (and one set of workers with their caches) serves every remaining epoch of the run."""
        cfg = self.cfg
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.main and cfg.log.progress),
                        desc="train", dynamic_ncols=True)
        self.t_start, self.consecutive_bad, self.last_val = time.perf_counter(), 0, {}
        keys = KeySampler(self.sampler, start_epoch=self.step // self.steps_per_epoch,
                          start_cursor=(self.step % self.steps_per_epoch) * self.micro * self.accum,
                          end_epoch=math.ceil(self.total_steps / self.steps_per_epoch))
        self.batches = iter(make_loader(self.dataset, self.micro, cfg.data.num_workers,
                                        pin_memory=self.device.type == "cuda", keys=keys))
        # the hooks come off when the run ends, however it ends (the model may be trained again in this process)
        if self.step >= self.total_steps:  # a finished run again: its model.pt is rewritten from the checkpoint
            self.last_val = self.resumed_metrics  # (an earlier try may have been unable to write it: a full disk)
            self.save(self.last_val, False)
        with _StopFlag() as stop, self.in_backward or contextlib.nullcontext():
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                self.sampler.set_epoch(epoch)
                while self.step < self.total_steps and self.step // self.steps_per_epoch == epoch:
                    stopping = self.train_step(epoch, stop)
                    improved = self.maybe_validate(epoch)
                    self.maybe_checkpoint(improved, stopping)
                    if stopping:
                        self.stop(stop)
        return self.finish()

    def train_step(self, epoch: int, stop: _StopFlag) -> bool:
        """One optimizer step over the global batch (or a skipped one: NaN/Inf loss on any rank), logged.
        Returns True when a stop signal reached any rank. TrainingError after `max_bad_steps` skips in a row."""
        t0 = time.perf_counter()
        lr = lr_at_step(self.cfg.schedule, self.cfg.optim.lr, self.step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_step_seed(self.cfg.seed, self.step, self.rank))
        totals = self._accumulate()
        # agree on skipping across ranks: a NaN on any rank poisons the all-reduced gradient
        flags = torch.tensor([0.0 if torch.isfinite(totals).all() else 1.0, float(stop.signum)], device=self.device)
        if self.world > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        grad_norm = self._skip() if flags[0] > 0 else self._update()
        self.step += 1
        self._log_step(totals, lr, epoch, grad_norm, t0)
        return bool(flags[1] > 0)

    def _accumulate(self) -> torch.Tensor:
        """Forward and backward of each micro-batch (gradients all-reduced on the last only); returns float64
        [loss, *terms] averaged over the micro-batches."""
        model, objective, device, accelerator = self.model, self.objective, self.device, self.accelerator
        totals = torch.zeros(1 + len(self.term_names), dtype=torch.float64)
        for k in range(self.accum):
            batch = next(self.batches)
            if self.keys_log is not None:
                for e, p, d, i in zip(batch["epoch"].tolist(), batch["position"].tolist(),
                                      batch["dataset_index"].tolist(), batch["example_index"].tolist(), strict=True):
                    self.keys_log.write(f"{self.step},{e},{p},{d},{i}\n")
                self.keys_log.flush()
            batch = _to_device(batch, device)
            with torch.no_grad(), accelerator.autocast():
                batch = objective.prepare_batch(batch, device)
            sync = contextlib.nullcontext() if k == self.accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                # the first step keeps the threshold through its backward pass, where AdamW creates its state
                with forward_allocations(self.forward_mmap_mb, keep_after=not self.inner_optimizer.state):
                    out = model(batch)
                values = torch.tensor([float(out[n].detach()) for n in ("loss", *self.term_names)],
                                      dtype=torch.float64)
                # with the step fused into the backward pass, a NaN/Inf loss must not reach it
                if self.in_backward is None or torch.isfinite(values).all():
                    accelerator.backward(out["loss"] / self.accum)
            totals += values / self.accum
        return totals

    def _update(self) -> float:
        """Apply the step's gradients (clipped when optim.grad_clip > 0); returns the gradient norm (NaN when not
        clipped)."""
        self.consecutive_bad = 0
        grad_norm = float("nan")
        if self.in_backward is None:  # else every parameter was stepped inside the backward pass
            if self.cfg.optim.grad_clip > 0:
                grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _skip(self) -> float:
        """Drop the step's gradients (a NaN/Inf loss); TrainingError after `max_bad_steps` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive_bad += 1
        if self.consecutive_bad >= self.cfg.max_bad_steps:
            self.bar.close()
            raise TrainingError(
                f"{self.consecutive_bad} steps in a row had a NaN/Inf loss (last at step {self.step}); the run "
                f"stopped; {self._last_checkpoint()}; lower optim.lr or check the data"
            )
        return float("nan")

    def _last_checkpoint(self) -> str:
        """Where the run can go on from, in words (for the message of a run that fails)."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"its last checkpoint (step {self.saved_step}, {ckpt.last_dir(self.run)}) is intact"

    def _log_step(self, totals: torch.Tensor, lr: float, epoch: int, grad_norm: float, t0: float) -> None:
        """The progress bar, and a metrics.csv / tracker row every `log.every_steps` steps and at the end."""
        loss_mean = totals.clone()
        if self.world > 1:
            loss_mean = self.accelerator.reduce(loss_mean.to(self.device), reduction="mean").cpu()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(loss_mean[0]):.4f}", lr=f"{lr:.2e}", epoch=epoch)
        step = self.step
        row = {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss_mean[0]),
               **{n: float(v) for n, v in zip(self.term_names, loss_mean[1:].tolist(), strict=True)},
               "grad_norm": grad_norm,
               "samples_per_s": self.cfg.batch_size / max(time.perf_counter() - t0, 1e-9),
               "skipped_steps": self.skipped, "seconds": time.perf_counter() - self.t_start}
        if self.main and (step % self.cfg.log.every_steps == 0 or step == self.total_steps):
            self.metrics.write(row)
            if self.accelerator.log_with:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def maybe_validate(self, epoch: int) -> bool:
        """At the end of an epoch when due (`_due`): the objective's validation on every rank; returns True when
        the best metric improved (the best step then changes)."""
        cfg, step = self.cfg, self.step
        epoch_done = step % self.steps_per_epoch == 0 or step == self.total_steps
        if not (epoch_done and self.val_images and _due(cfg, epoch, step == self.total_steps)):
            return False
        improved = False
        self.last_val = self.objective.validate(
            self.net, self.val_images, len(self.val_roots), self.rank, self.world, self._reduce_sum,
            channels=self.channels, use_true_diameter=self.use_true_diameter, batch_size=cfg.val.batch_size,
            niter=cfg.val.niter, flow_threshold=cfg.val.flow_threshold,
            cellprob_threshold=cfg.val.cellprob_threshold, mask_rules=cfg.val.mask_rules, device=self.device,
            dataset_names=self.val_names, progress=cfg.log.progress,
        )
        self.net.train()
        best_key, last_val = self.objective.best_metric, self.last_val
        if last_val and best_key in last_val and (self.best_ap is None or last_val[best_key] > self.best_ap):
            self.best_ap, self.best_step, improved = last_val[best_key], step, True
        if self.main:
            self.metrics.write({"step": step, "epoch": epoch, **last_val})
            if self.accelerator.log_with:
                self.accelerator.log({k.replace("/", "_"): v for k, v in last_val.items()}, step=step)
            self.bar.write(f"step {step} epoch {epoch}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in last_val.items() if not k.startswith("val_ap50/")))
        return improved

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.device), reduction="sum").cpu() if self.world > 1 else t

    def maybe_checkpoint(self, improved: bool, stopping: bool) -> None:
        """Save every `checkpoint.every_steps` steps, at the end, on a new best and before a stop; never during
        a streak of NaN steps (if it ends the run, the last checkpoint predates it), except at the run's end (the
        skipped steps left the weights as the last update made them; `save` refuses non-finite ones)."""
        step = self.step
        end = step == self.total_steps
        due = step % self.cfg.checkpoint.every_steps == 0 or end or improved or stopping
        if due and (self.consecutive_bad == 0 or end):
            self.save(self.last_val, improved)

    def save(self, last_metrics: dict[str, float], improved: bool) -> None:
        """The whole state (checkpoints/last, written atomically by rank 0) and RUN/model.pt; both copied to
        checkpoints/best when `improved`. Every rank's RNG state is gathered into it. A failed write warns.

        Weights with a NaN or an Inf are never saved (the one finite-model check of every save): TrainingError on
        every rank (they hold the same weights), the previous checkpoint and model.pt left as they were."""
        cfg, step, epoch = self.cfg, self.step, self.step // self.steps_per_epoch
        bad = ckpt.non_finite({**self.net.state_dict(), **{f"aux.{k}": v for k, v in self.aux.state_dict().items()}})
        if bad:
            self.bar.close()
            raise TrainingError(
                f"the weights are not finite after step {step} (NaN/Inf in {len(bad)} tensors, e.g. {bad[0]}); "
                f"nothing saved; {self._last_checkpoint()}; lower optim.lr or check the data"
            )
        rngs = [ckpt.rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object  # accelerate loads only when a run starts (see make_accelerator)

            rngs = gather_object(rngs)
        if not self.main:
            return
        payload = {
            "model": ckpt.cpu_state_dict(self.net), "aux": ckpt.cpu_state_dict(self.aux),
            "objective": self.objective.name, "optimizer": self.optimizer.state_dict(), "step": step, "epoch": epoch,
            "sampler": {**self.sampler.state_dict(), "epoch": epoch,
                        "cursor": (step % self.steps_per_epoch) * self.micro * self.accum},
            "rng": rngs, "best_ap50": self.best_ap, "best_step": self.best_step, "skipped": self.skipped,
            "config": to_container(cfg), "world_size": self.world, "metrics": last_metrics,
        }
        run = self.run
        extra = {"step": step, "epoch": epoch, "config": to_container(cfg), "metrics": last_metrics,
                 "inference": self.objective.inference_record(self.net)}
        if improved:
            self.unsaved_best = None  # superseded
        elif self.unsaved_best is not None:  # a best whose write failed earlier (disk full): written once there is room
            try:
                self._write_best(*self.unsaved_best)
                self.unsaved_best = None
            except OSError as exc:
                print(f"warning: best checkpoint of step {self.unsaved_best[0]['step']} still not written ({exc})",
                      file=sys.stderr)
        best_written = False
        try:
            path = ckpt.save_state(ckpt.last_dir(run), payload)
            self.saved_step = step
            save_checkpoint(run / "model.pt", self.net, **extra)
            self.failed_save = None
            if improved:
                ckpt.copy_atomic(path, ckpt.best_dir(run) / ckpt.STATE_FILE)
                ckpt.copy_atomic(run / "model.pt", ckpt.best_dir(run) / "model.pt")
                best_written = True
        except OSError as exc:  # disk full / read-only: the previous checkpoint is intact (atomic writes)
            self.failed_save = (step, str(exc))
            print(f"warning: checkpoint at step {step} not written ({exc}); the previous one is intact",
                  file=sys.stderr)
        if improved and not best_written:  # kept in memory (a copy: the optimizer's state moves on) until written
            self.unsaved_best = (copy.deepcopy(payload), extra)

    def _write_best(self, payload: dict[str, Any], extra: dict[str, Any]) -> None:
        """checkpoints/best (state.pt and model.pt) from a saved payload (`save`); OSError when it cannot."""
        ckpt.save_state(ckpt.best_dir(self.run), payload)
        net = self.net
        model = create_model(net.model_name, **net.model_kwargs())
        model.load_state_dict(payload["model"])
        save_checkpoint(ckpt.best_dir(self.run) / "model.pt", model, **extra)

    def stop(self, stop: _StopFlag) -> NoReturn:
        """After a stop signal (checkpoint already written): shut the loader down, report the signal and raise
        RunStopped (every rank)."""
        del self.batches
        self.bar.close()
        signum = int(stop.signum) or signal.SIGTERM
        if self.main and self.failed_save is not None:
            print(f"stopped by signal {signum} at step {self.step}; its checkpoint could not be written "
                  f"({self.failed_save[1]}); {self._last_checkpoint()}; rerun the same command to resume from it",
                  file=sys.stderr)
        elif self.main:
            print(f"stopped by signal {signum} at step {self.step}; checkpoint written to {ckpt.last_dir(self.run)}; "
                  "rerun the same command to resume", file=sys.stderr)
        self.accelerator.end_training()
        raise RunStopped(TrainResult(self.run, self.step, self.step // self.steps_per_epoch, int(signum),
                                     self.best_ap, self.last_val, self.skipped, self.main))

    def finish(self) -> TrainResult:
        """The run's end: shut the loader down, wait for every rank, draw curves.png (rank 0)."""
        del self.batches
        self.bar.close()
        self.accelerator.wait_for_everyone()
        if self.main and self.failed_save is not None:  # the run's model is not on disk: not a finished run
            self.accelerator.end_training()
            raise TrainingError(
                f"trained {self.step} steps but the final checkpoint could not be written ({self.failed_save[1]}); "
                f"{self._last_checkpoint()}; free space and rerun the same command to finish from it")
        if self.main:
            plot_curves(self.run / "metrics.csv", self.run / "curves.png")
        self.accelerator.end_training()
        return TrainResult(self.run, self.step, self.step // self.steps_per_epoch, 0, self.best_ap, self.last_val,
                           self.skipped, self.main)


def _due(cfg: TrainConfig, epoch: int, last: bool) -> bool:
    """Validate after epoch `epoch` (0-based) every `val.every_epochs` epochs, and at the end of the run."""
    every = cfg.val.every_epochs
    return every > 0 and ((epoch + 1) % every == 0 or last)
