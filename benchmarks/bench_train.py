"""Benchmark: one CP-SAM training step, ours vs cellpose 4's own, same weights and batch, one fresh process each.

Run:  python -m benchmarks.bench_train [--batch-sizes 1 2] [--steps 3] [--model cpsam_vit_l] [--threads N]
                                 [--skip-layer-drop] [--attention sdpa|math] [--activation-checkpointing]
                                 [--plain-autograd] [--host-mmap-threshold-mb MB] [--step-in-backward auto|on|off]
                                 [--profile 15]

A training step is forward, loss, backward and an AdamW step (lr 1e-5, weight decay 0.1, as
`cellpose.train.train_seg`), in float32 on CPU, on seeded 3-channel 256 x 256 tiles with a seeded
target [cellprob, dY, dX]:

- cellpose: `cellpose.vit.CPSAM(rdrop=...)` (cellpose 4.2's CP-SAM network), `cellpose.train._loss_fn_seg`,
  zero_grad before backward as in train_seg (last step's gradients stay alive during the forward).
- ours:     `cpsam.models.loading.cellpose_sam_from_state_dict` on the same state_dict (ViT-L; attention path
  `--attention`, default sdpa as in training; `--activation-checkpointing` as the training option
  model.activation_checkpointing), `train.loss.cellpose_loss`, the loop's `make_optimizer` (fused AdamW),
  zero_grad(set_to_none) after the optimizer step as in train/loop.py; the training loop's CPU memory
  machinery: the optimizer step fused into the backward pass (train.optim_in_backward, optim.step_in_backward;
  `--step-in-backward off` = a separate step), the forward-phase mmap threshold (train.host_memory,
  host_mmap_threshold_mb; `--host-mmap-threshold-mb 0` = glibc's default) and the lean autograd functions
  (cpsam.models.lean_autograd; `--plain-autograd` runs the plain modules instead), to measure each part.

Every configuration runs in its own fresh process (allocator state and page faults matter): it loads
the weight file, runs one warm-up step and `--steps` timed steps; medians are reported, split into
forward (+ loss), backward and optimizer, with the process's CPU time (all threads), which background
load distorts less than wall time, and minor page faults. A child that fails (e.g. killed when out of
memory) is reported as failed and the run goes on. torch.manual_seed is fixed before every step, to
the same value on both sides, so that with layer drop both draw the same per-sample drop pattern (both draw
`torch.rand(B, depth) < linspace(0, rate, depth)` first thing). Blocks skipped = fraction of
(sample, block) block computations not run, counted by forward hooks on the blocks (cellpose computes
every block and masks the result: 0 %).
Peak RSS: the child's whole-process peak resident set (ru_maxrss): weights, gradients, AdamW state
and activations. "after load": the RSS once the model is built (AdamW's state appears at its first step).
Gradients: with layer drop off, the warm-up step's gradients (same weights, same batch) are saved by
both children and compared parameter by parameter: global ||g_ours - g_cp|| / ||g_cp|| over all
parameters with a gradient on both sides, and the worst single parameter. cellpose's forward applies
the patch embedding through `.weight.data` / `.bias.data`, so those two tensors get no gradient there
(frozen in cellpose training); they are listed and left out of the comparison.
The cellpose side exists only for ViT-L (CPSAM builds SAM's vit_l and nothing else); with another
`--model` only our side runs.
Weights: random, in the official layout, written by cellpose's CPSAM with every tensor perturbed so
that none is zero (benchmarks.bench_model.make_reference_weights; SAM's init leaves pos-embed and rel-pos zero).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cpsam.cli_types import positive_int

REPO = Path(__file__).resolve().parents[1]
SIDES = ("cellpose", "ours")
CELLPOSE_MODEL = "cpsam_vit_l"
PAPER_LAYER_DROP = 0.4
TILE = 256
SEED = 0
LR, WEIGHT_DECAY = 1e-5, 0.1


def step_seed(batch: int, step: int) -> int:
    """torch.manual_seed value before step `step` (0 = warm-up) at batch size `batch`, the same on both sides."""
    return SEED + 1000 * batch + step


def make_batch(batch: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded input (B, channels, 256, 256) float32 ~ N(0, 1) and target (B, 3, 256, 256) float32
    [cellprob in {0, 1}, dY, dX in [-1, 1]]."""
    gen = torch.Generator().manual_seed(SEED + batch)
    x = torch.randn(batch, channels, TILE, TILE, generator=gen)
    cellprob = (torch.rand(batch, 1, TILE, TILE, generator=gen) > 0.5).float()
    flows = torch.rand(batch, 2, TILE, TILE, generator=gen) * 2.0 - 1.0
    return x, torch.cat([cellprob, flows], dim=1)


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of freshly mapped memory, mostly)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def build_network(side: str, model_name: str, weights: Path | None, layer_drop: float) -> nn.Module:
    """The network of `side` in float32 train mode on CPU, loaded from `weights` (our side: seeded random
    init of `model_name` when weights is None)."""
    if side == "cellpose":
        # imported in the process that runs this measurement only (each side starts fresh)
        from cellpose.vit import CPSAM

        net = CPSAM(rdrop=layer_drop)
        net.load_model(weights, device=torch.device("cpu"))
    else:
        # imported in the process that runs this measurement only (each side starts fresh)
        from cpsam.models import create_model
        from cpsam.models.loading import cellpose_sam_from_state_dict

        if weights is None:
            torch.manual_seed(SEED)
            net = create_model(model_name, layer_drop=layer_drop)
        else:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
            net = cellpose_sam_from_state_dict(state_dict, source=str(weights))
            del state_dict
            net.layer_drop = net.config.layer_drop = layer_drop  # what train.model_init.set_layer_drop does
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return net.float().train()


def loss_function(side: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(output (B, 3, H, W), target (B, 3, H, W)) -> float32 0-d loss, the side's own implementation."""
    if side == "cellpose":
        # imported in the process that runs this measurement only (each side starts fresh)
        from cellpose.train import _loss_fn_seg

        return lambda y, target: _loss_fn_seg(target, y, torch.device("cpu"))
    # imported in the process that runs this measurement only (each side starts fresh)
    from train.loss import cellpose_loss

    return lambda y, target: cellpose_loss(y, target)


class BlockCounter:
    """Forward pre-hooks on every transformer block counting the samples that go through it."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.depth = len(blocks)
        self.samples = 0
        self.handles = [block.register_forward_pre_hook(self._count) for block in blocks]

    def _count(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.samples += int(args[0].shape[0])


def drawn_drop_fraction(batch: int, depth: int, rate: float) -> float:
    """Fraction of (sample, block) pairs the next layer-drop draw of either network will drop (the RNG is
    left untouched): both draw `torch.rand(batch, depth) < linspace(0, rate, depth)` first."""
    if rate <= 0:
        return 0.0
    state = torch.get_rng_state()
    drop = torch.rand(batch, depth) < torch.linspace(0.0, rate, depth)
    torch.set_rng_state(state)
    return float(drop.float().mean())


PHASES = ("wall", "forward", "backward", "optimizer", "cpu", "faults_forward", "faults_backward", "faults_optimizer")


def run_child(side: str, model_name: str, weights: Path | None, batch: int, steps: int, layer_drop: float,
              attention: str, checkpointing: bool, grads_out: Path | None, profile_rows: int,
              lean: bool = True, mmap_threshold_mb: float = 0.0, step_in_backward: str = "off") -> dict:
    """Inside a fresh process: build `side`, run one warm-up and `steps` timed training steps.

    Returns, per timed step, seconds of wall time (total, forward + loss, backward, optimizer), the process's CPU
    seconds and its minor page faults; peak RSS in bytes (ru_maxrss) and RSS after building; the warm-up loss; the
    fractions of (sample, block) pairs dropped and skipped. With `grads_out`, the warm-up gradients {name: tensor}
    are saved there before the optimizer step (not timed). `attention` and `checkpointing` (recompute each block
    in the backward pass, train.model_init) apply to our side only, as do `lean` (the lean autograd functions,
    else plain autograd), `mmap_threshold_mb` (train.host_memory, as train.loop: set at the start and for every
    forward pass; 0 = glibc's default) and `step_in_backward` (train.optim_in_backward, optim.step_in_backward:
    the optimizer step runs inside the backward pass, whose time then includes it). With `profile_rows`, one more
    (untimed) step runs under torch.profiler and the table of its top ops is returned.
    """
    # imported in the process that runs this measurement only (each side starts fresh)
    from train.host_memory import forward_allocations, set_mmap_threshold

    ours = side == "ours"
    if ours:  # what train.loop.train does first on a CPU (host_mmap_threshold_mb)
        set_mmap_threshold(mmap_threshold_mb)
    net = build_network(side, model_name, weights, layer_drop)
    if ours:
        net.set_attention_path(attention)
        net.set_lean_training(lean)
        if checkpointing:
            # imported in the process that runs this measurement only (each side starts fresh)
            from train.model_init import enable_activation_checkpointing

            enable_activation_checkpointing(net)
    params = [p for p in net.parameters() if p.requires_grad]
    if ours:  # the training loop's optimizer (fused AdamW)
        from train.config import OptimConfig
        from train.loop import make_optimizer

        optimizer = make_optimizer(params, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY), torch.device("cpu"))
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    fused_step = False
    if ours:
        # imported in the process that runs this measurement only (each side starts fresh)
        from train import optim_in_backward

        fused_step = optim_in_backward.wanted(step_in_backward, torch.device("cpu"), [])
    saving = {"on": False}
    grad_files = Path(tempfile.mkdtemp(prefix="grads_")) if grads_out is not None and fused_step else None
    if grad_files is not None:  # the gradients are freed inside the backward pass: write each one as it comes
        names = {p: n for n, p in net.named_parameters()}

        def write_gradient(param: torch.Tensor) -> None:
            if saving["on"]:
                torch.save(param.grad, grad_files / f"{names[param]}.pt")

        for param in params:  # registered first: runs before the step's hook
            param.register_post_accumulate_grad_hook(write_gradient)
    if fused_step:
        optim_in_backward.StepInBackward(optimizer)
    loss_fn = loss_function(side)
    x, target = make_batch(batch)
    counter = BlockCounter(net.encoder.blocks)
    rss_loaded = rss_bytes()

    def one_step(step: int, save: Path | None = None) -> tuple[dict[str, float], float]:
        torch.manual_seed(step_seed(batch, step))
        faults = [minor_faults()]
        saving["on"] = save is not None
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.autograd.profiler.record_function("forward+loss"):
            # as train.loop: the first step keeps the threshold through the backward pass (AdamW's state)
            with forward_allocations(mmap_threshold_mb if ours else 0.0, keep_after=not optimizer.state):
                loss = loss_fn(net(x)[0], target)
        t_forward = time.perf_counter()
        faults.append(minor_faults())
        with torch.autograd.profiler.record_function("backward"):
            if side == "cellpose":
                optimizer.zero_grad()  # train_seg's order: gradients live until the next backward
            loss.backward()
        t_backward, cpu_backward = time.perf_counter(), time.process_time()
        faults.append(minor_faults())
        if save is not None and grad_files is None:
            torch.save({n: p.grad for n, p in net.named_parameters() if p.grad is not None}, save)
        elif save is not None:
            torch.save({f.stem: torch.load(f, weights_only=True) for f in sorted(grad_files.glob("*.pt"))}, save)
            shutil.rmtree(grad_files)
        saving["on"] = False
        t_save, cpu_save = time.perf_counter(), time.process_time()
        faults.append(minor_faults())
        with torch.autograd.profiler.record_function("optimizer"):
            if not fused_step:
                optimizer.step()
                if ours:
                    optimizer.zero_grad(set_to_none=True)  # train/loop.py's order
        end = time.perf_counter()
        faults.append(minor_faults())
        saving_time = t_save - t_backward
        times = {"wall": end - start - saving_time, "forward": t_forward - start, "backward": t_backward - t_forward,
                 "optimizer": end - t_save, "cpu": time.process_time() - start_cpu - (cpu_save - cpu_backward),
                 "faults_forward": faults[1] - faults[0], "faults_backward": faults[2] - faults[1],
                 "faults_optimizer": faults[4] - faults[3]}
        return times, float(loss.detach())

    _, warm_loss = one_step(0, grads_out)
    counter.samples = 0
    dropped, timings = [], []
    for step in range(1, steps + 1):
        torch.manual_seed(step_seed(batch, step))
        dropped.append(drawn_drop_fraction(batch, counter.depth, layer_drop))
        timings.append(one_step(step)[0])
    skipped = 1.0 - counter.samples / (steps * batch * counter.depth)
    result: dict = {phase: [t[phase] for t in timings] for phase in PHASES}
    result.update(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_loaded=rss_loaded,
                  loss=warm_loss, dropped=statistics.mean(dropped), skipped=skipped, threads=torch.get_num_threads())
    if profile_rows:
        # imported in the process that runs this measurement only (each side starts fresh)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(steps + 1)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows)
    return result


def measure(side: str, args: argparse.Namespace, weights: Path | None, batch: int, layer_drop: float,
            grads_out: Path | None) -> dict:
    """Run `run_child` in a fresh subprocess (`python -m benchmarks.bench_train --child ...`) and return its result,
    or {"error": one-line reason} when the child fails (a child killed by SIGKILL has most likely run out of
    memory)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--child", side, "--model", args.model,
           "--batch-sizes", str(batch), "--steps", str(args.steps), "--threads", str(args.threads),
           "--layer-drop", str(layer_drop), "--attention", args.attention, "--profile", str(args.profile)]
    if args.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if args.plain_autograd:
        cmd.append("--plain-autograd")
    cmd += ["--host-mmap-threshold-mb", str(args.host_mmap_threshold_mb), "--step-in-backward", args.step_in_backward]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if grads_out is not None:
        cmd += ["--grads-out", str(grads_out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode == -9:
        return {"error": "killed by SIGKILL (most likely out of memory)"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        print(f"benchmark child {side} (batch {batch}, layer drop {layer_drop}) failed:\n"
              + "\n".join(lines[-15:]), file=sys.stderr)
        return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no message'}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_gradients(ours_path: Path, cellpose_path: Path) -> dict:
    """Relative gradient difference of the parameters both sides have a gradient for.

    Returns global = ||g_ours - g_cp|| / ||g_cp|| over all of them, worst = (name, relative difference) of the
    worst single parameter, n = how many were compared, and only_ours / only_cellpose = names with a gradient
    on one side only.
    """
    ours = torch.load(ours_path, mmap=True, weights_only=True)
    theirs = torch.load(cellpose_path, mmap=True, weights_only=True)
    common = [name for name in theirs if name in ours]
    diff_sq = ref_sq = 0.0
    worst = ("", 0.0)
    for name in common:
        g_ours, g_cp = ours[name].double(), theirs[name].double()
        d, r = float((g_ours - g_cp).square().sum()), float(g_cp.square().sum())
        diff_sq += d
        ref_sq += r
        rel = (d / r) ** 0.5 if r > 0 else (0.0 if d == 0 else float("inf"))
        if rel > worst[1]:
            worst = (name, rel)
    return {
        "global": (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("nan"), "worst": worst, "n": len(common),
        "only_ours": sorted(set(ours) - set(theirs)), "only_cellpose": sorted(set(theirs) - set(ours)),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2], help="default: 1 2")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps after 1 warm-up (default 3)")
    parser.add_argument("--model", default=CELLPOSE_MODEL,
                        help=f"our registry model (default {CELLPOSE_MODEL}; the cellpose side runs only for it)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="torch threads per process (default: all cores)")
    parser.add_argument("--skip-layer-drop", action="store_true",
                        help=f"skip the layer-drop {PAPER_LAYER_DROP} runs")
    parser.add_argument("--attention", choices=("sdpa", "math"), default="sdpa",
                        help="our attention path (default sdpa, what training uses); math = SAM's computation")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="our side recomputes each block's activations in the backward pass (model option)")
    parser.add_argument("--plain-autograd", action="store_true",
                        help="our side trains through plain autograd, not cpsam.models.lean_autograd")
    parser.add_argument("--host-mmap-threshold-mb", type=float, default=None,
                        help="our side's host_mmap_threshold_mb (train.host_memory; default: the loop's default)")
    parser.add_argument("--step-in-backward", choices=("auto", "on", "off"), default=None,
                        help="our side's optim.step_in_backward (train.optim_in_backward; default: the loop's)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after the timed steps, profile one more step per process and print its top ROWS ops")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layer-drop", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host_mmap_threshold_mb is None:
        # imported in the process that runs this measurement only (each side starts fresh)
        from train.config import TrainConfig
        from train.host_memory import AUTO_MIN_PARAMETERS, forward_threshold_mb

        # the loop's default for this model: CP-SAM ViT-L has more than AUTO_MIN_PARAMETERS parameters
        args.host_mmap_threshold_mb = forward_threshold_mb(TrainConfig().host_mmap_threshold_mb, AUTO_MIN_PARAMETERS)
    if args.step_in_backward is None:
        # imported in the process that runs this measurement only (each side starts fresh)
        from train.config import OptimConfig

        args.step_in_backward = OptimConfig().step_in_backward

    if args.child:
        torch.set_num_threads(args.threads)
        result = run_child(args.child, args.model, args.weights, args.batch_sizes[0], args.steps, args.layer_drop,
                           args.attention, args.activation_checkpointing, args.grads_out, args.profile,
                           lean=not args.plain_autograd, mmap_threshold_mb=args.host_mmap_threshold_mb,
                           step_in_backward=args.step_in_backward)
        print(json.dumps(result))
        return 0

    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam.models import list_models

    if args.model not in list_models():
        parser.error(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
    with_cellpose = args.model == CELLPOSE_MODEL
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    folder = Path(tmp.name)
    weights = None
    if with_cellpose:
        # imported in the process that runs this measurement only (each side starts fresh)
        from benchmarks.bench_model import make_reference_weights

        weights = folder / "cpsam_random.pt"
        make_reference_weights(weights, seed=SEED)
    else:
        print(f"--model {args.model}: cellpose 4's CPSAM is built only as ViT-L ({CELLPOSE_MODEL}); "
              "running our side alone (no ratios, no gradient comparison)")
    # imported in the process that runs this measurement only (each side starts fresh)
    from importlib.metadata import version

    sides = SIDES if with_cellpose else ("ours",)
    rates = [0.0] if args.skip_layer_drop else [0.0, PAPER_LAYER_DROP]
    print(f"model={args.model} threads={args.threads} torch={torch.__version__} cellpose={version('cellpose')} "
          f"steps={args.steps} (+1 warm-up) batch sizes={args.batch_sizes} layer drop={rates}", flush=True)

    checkpointing = args.activation_checkpointing
    results: dict[tuple[str, int, float], dict] = {}
    grads: dict[int, dict] = {}
    for rate in rates:
        for batch in args.batch_sizes:
            for side in sides:
                grads_out = folder / f"grads-{side}-{batch}.pt" if rate == 0 and with_cellpose else None
                res = results[side, batch, rate] = measure(side, args, weights, batch, rate, grads_out)
                print(f"  batch {batch} {side:8s} layer drop {rate:.1f}: {summary(res)}", flush=True)
                if res.get("profile"):
                    print(f"--- profile: {side}, batch {batch}, layer drop {rate} ---\n{res['profile']}", flush=True)
            saved = {side: folder / f"grads-{side}-{batch}.pt" for side in sides}
            ran = all("error" not in results[side, batch, rate] for side in sides)
            if rate == 0 and with_cellpose and ran and all(path.is_file() for path in saved.values()):
                grads[batch] = compare_gradients(saved["ours"], saved["cellpose"])
            for path in saved.values():
                path.unlink(missing_ok=True)

    print(f"\nload average after the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("\n| batch | side | layer drop | step s | forward s | backward s | optimizer s | CPU s "
          "| page faults fwd / bwd / opt (k) | peak RSS GB "
          "| RSS after load GB | blocks dropped | blocks skipped | warm-up loss |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (side, batch, rate), res in results.items():
        options = [args.attention] + ["checkpointing"] * checkpointing + ["plain autograd"] * args.plain_autograd \
            + [f"forward mmap threshold {args.host_mmap_threshold_mb:g} MiB"] * (args.host_mmap_threshold_mb > 0) \
            + ["step in backward"] * (args.step_in_backward != "off")
        name = side if side == "cellpose" else f"ours ({', '.join(options)})"
        if "error" in res:
            print(f"| {batch} | {name} | {rate:.1f} | failed: {res['error']} |" + " |" * 10)
            continue
        print(f"| {batch} | {name} | {rate:.1f} | {median(res['wall']):.2f} | {median(res['forward']):.2f} "
              f"| {median(res['backward']):.2f} | {median(res['optimizer']):.2f} | {median(res['cpu']):.2f} "
              f"| {faults(res)} | {res['peak_rss'] / 1e9:.2f} | {res['rss_loaded'] / 1e9:.2f} "
              f"| {res['dropped']:.1%} | {res['skipped']:.1%} | {res['loss']:.6f} |")
    if not with_cellpose:
        return 0

    print()
    for batch, g in grads.items():
        loss_ours, loss_cp = results["ours", batch, 0.0]["loss"], results["cellpose", batch, 0.0]["loss"]
        print(f"gradients (batch {batch}): {g['n']} parameters compared, global rel diff {g['global']:.1e}, "
              f"worst {g['worst'][0]} {g['worst'][1]:.1e}; warm-up loss rel diff "
              f"{abs(loss_ours - loss_cp) / abs(loss_cp):.1e}; gradient only in ours: {g['only_ours'] or 'none'}, "
              f"only in cellpose: {g['only_cellpose'] or 'none'}")
    print("goal: >= 1.3x faster and <= 0.6x cellpose's peak RSS; gradients equal to 1e-4")
    for rate in rates:
        for batch in args.batch_sizes:
            ours, theirs = results["ours", batch, rate], results["cellpose", batch, rate]
            label = "train step vs cellpose" if rate == 0 else f"train step, layer drop {rate} both, vs cellpose"
            print(f"{label} (batch {batch}): {ratio_line(ours, theirs, grads.get(batch) if rate == 0 else None)}")
    return 0


def faults(res: dict) -> str:
    """Median minor page faults per phase, in thousands: 'forward / backward / optimizer'."""
    return " / ".join(f"{median(res[f'faults_{phase}']) / 1000:.0f}" for phase in ("forward", "backward", "optimizer"))


def summary(res: dict) -> str:
    """One progress line for a configuration's result."""
    if "error" in res:
        return f"FAILED ({res['error']})"
    return (f"step {median(res['wall']):7.2f} s (fwd {median(res['forward']):.2f}, bwd {median(res['backward']):.2f}, "
            f"opt {median(res['optimizer']):.2f}), cpu {median(res['cpu']):7.2f} s, "
            f"peak RSS {res['peak_rss'] / 1e9:.2f} GB, skipped {res['skipped']:.1%}")


def ratio_line(ours: dict, theirs: dict, grads: dict | None) -> str:
    """'1.35x faster (CPU time 1.2x), peak RSS 0.55x, ...' for ours vs cellpose (> 1 = ours faster)."""
    failed = [f"{side} {res['error']}" for side, res in (("ours", ours), ("cellpose", theirs)) if "error" in res]
    if failed:
        return "not measured: " + "; ".join(failed)
    speed = median(theirs["wall"]) / median(ours["wall"])
    cpu = median(theirs["cpu"]) / median(ours["cpu"])
    memory = ours["peak_rss"] / theirs["peak_rss"]
    if theirs["skipped"] or ours["skipped"]:
        tail = f"blocks skipped {ours['skipped']:.0%} (cellpose {theirs['skipped']:.0%})"
    else:
        tail = f"grad rel diff {grads['global']:.0e}" if grads else "grad rel diff not measured"
    return f"{speed:.2f}x faster (CPU time {cpu:.2f}x), peak RSS {memory:.2f}x, {tail}"


if __name__ == "__main__":
    sys.exit(main())
