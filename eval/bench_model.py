"""Benchmark: our Cellpose-SAM forward vs cellpose 4's `cellpose.vit.CPSAM`, same weights, same process.

Run:  .venv/bin/python eval/bench_model.py [--batches 1,4] [--repeats 3] [--device cpu] [--no-memory]

Configurations: cellpose fp32 / bf16, ours math / sdpa in fp32 / bf16, on 256x256 tiles.
Timing: all models live in one process and are timed round-robin (one forward of each per round,
after a warm-up), so background load affects them alike; the median per configuration is
reported with the ratio cellpose-fp32 / config (> 1 means faster than cellpose), for wall-clock
time and for this process's CPU time (all its threads), which background load distorts less.
Accuracy: max |y - y_cellpose_fp32| / max |y_cellpose_fp32| on the same input.
Peak memory: on CUDA, torch.cuda.max_memory_allocated during one forward; on CPU, the peak
resident-set growth of one forward (Linux VmHWM, reset after loading) in a fresh subprocess per
configuration, so that memory cached by the allocator from other models cannot hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("cellpose-fp32", "cellpose-bf16", "ours-math-fp32", "ours-sdpa-fp32", "ours-math-bf16", "ours-sdpa-bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_reference_weights(path: Path, seed: int = 0) -> None:
    """Random weights in the official layout, written by cellpose's own CPSAM (non-zero everywhere)."""
    from cellpose.vit import CPSAM

    torch.manual_seed(seed)
    ref = CPSAM()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "neck.1.weight", "neck.3.weight")) else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + base)
    torch.save(ref.state_dict(), path)


def build(config: str, weights: Path, device: str) -> torch.nn.Module:
    """One benchmark configuration, loaded from the same weight file, in eval mode on `device`."""
    family, *rest = config.split("-")
    dtype = DTYPES[rest[-1]]
    if family == "cellpose":
        from cellpose.vit import CPSAM

        model = CPSAM()
        model.load_model(weights, device=torch.device("cpu"))
    else:
        from cpsam.models import load_model

        model = load_model(weights, attention=rest[0])
    return model.to(device=device, dtype=dtype).eval()


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        y = model(x.to(dtype))[0]
    if y.is_cuda:
        torch.cuda.synchronize()
    return y.float()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Return freed heap to the OS and reset the kernel's peak-RSS mark (VmHWM) of this process."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_memory(config: str, weights: Path, device: str, batch: int) -> int:
    """Peak memory growth (bytes) of one forward of `config` (run inside a fresh process)."""
    model = build(config, weights, device)
    x = torch.randn(batch, 3, 256, 256, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward(model, x)
        return torch.cuda.max_memory_allocated() - base
    reset_peak_rss()
    base = rss_bytes()
    forward(model, x)
    return peak_rss_bytes() - base


def measure_memory(config: str, weights: Path, device: str, batch: int) -> float:
    """Run `child_memory` in a subprocess; returns MiB."""
    cmd = [sys.executable, __file__, "--child", config, "--weights", str(weights), "--device", device,
           "--batches", str(batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"] / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-config memory subprocesses")
    parser.add_argument("--weights", type=Path, help="an official-layout cpsam file (default: random weights)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    if args.child:
        print(json.dumps({"bytes": child_memory(args.child, args.weights, args.device, batches[0])}))
        return 0

    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    if "cellpose-fp32" not in configs:
        configs.insert(0, "cellpose-fp32")
    tmp = tempfile.TemporaryDirectory()
    weights = args.weights
    if weights is None:
        weights = Path(tmp.name) / "cpsam_random"
        make_reference_weights(weights)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    models = {c: build(c, weights, args.device) for c in configs}

    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(batch)).to(args.device)
        outputs = {c: forward(m, x) for c, m in models.items()}  # warm-up + accuracy
        reference = outputs["cellpose-fp32"]
        wall: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c, m in models.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                forward(m, x)
                wall[c].append(time.perf_counter() - start)
                cpu[c].append(time.process_time() - start_cpu)
        base, base_cpu = statistics.median(wall["cellpose-fp32"]), statistics.median(cpu["cellpose-fp32"])
        for c in configs:
            med, med_cpu = statistics.median(wall[c]), statistics.median(cpu[c])
            err = float((outputs[c] - reference).abs().max() / reference.abs().max())
            mem = float("nan") if args.no_memory else measure_memory(c, weights, args.device, batch)
            rows.append((batch, c, med, base / med, med_cpu, base_cpu / med_cpu, err, mem))
            print(f"  batch {batch} {c:15s} {med:8.2f} s  x{base / med:5.2f}  cpu {med_cpu:8.2f} s  "
                  f"x{base_cpu / med_cpu:5.2f}  rel.err {err:.1e}  peak {mem:8.0f} MiB", flush=True)

    print(f"\nload average after the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"(wall-clock ratios are only meaningful on an otherwise idle machine; CPU-time ratios less affected)")
    print("\n| batch | model | wall s | wall speed-up | CPU s | CPU speed-up | max rel. diff | peak MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch, c, med, ratio, med_cpu, ratio_cpu, err, mem in rows:
        print(f"| {batch} | {c} | {med:.2f} | {ratio:.2f}x | {med_cpu:.2f} | {ratio_cpu:.2f}x | {err:.1e} "
              f"| {mem:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
