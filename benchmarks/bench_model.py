"""Benchmark: our Cellpose-SAM forward vs cellpose 4's `cellpose.vit.CPSAM`, same weights, one fresh process each.

Run:  python -m benchmarks.bench_model [--batches 1,4] [--repeats 3] [--device cpu] [--configs ...]

Configurations: cellpose fp32 / bf16, ours math / sdpa in fp32 / bf16, on 256x256 tiles.
Timing: every configuration runs in its own fresh process (one after the other), which loads the
same weight file, runs one warm-up forward (its peak memory is measured) and `--repeats` timed
forwards on the same seeded input; the median is reported with the ratio cellpose-fp32 / config
(> 1 means faster than cellpose), for wall-clock time and for the process's CPU time (all its
threads), which background load distorts less. Separate processes matter: cellpose's forward allocates fresh
(N, N) attention temporaries in every block, so its time depends on the allocator state other models left.
Accuracy: max |y - y_cellpose_fp32| / max |y_cellpose_fp32| on the same input.
Peak memory: on CUDA, torch.cuda.max_memory_allocated during the warm-up forward; on CPU, the peak
resident-set growth of that forward (Linux VmHWM, reset after loading).
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

CONFIGS = ("cellpose-fp32", "cellpose-bf16", "ours-math-fp32", "ours-sdpa-fp32", "ours-math-bf16", "ours-sdpa-bf16",
           "ours-sdpa-int8")
# int8: fp32 model whose nn.Linear layers (most of the ViT's time) are dynamically quantized (CPU only)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def make_reference_weights(path: Path, seed: int = 0) -> None:
    """Random weights in the official layout, written by cellpose's own CPSAM (non-zero everywhere)."""
    # imported in the process that runs this measurement only (each side starts fresh)
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
        # imported in the process that runs this measurement only (each side starts fresh)
        from cellpose.vit import CPSAM

        model = CPSAM()
        model.load_model(weights, device=torch.device("cpu"))
    else:
        # imported in the process that runs this measurement only (each side starts fresh)
        from cpsam.models import load_model

        model = load_model(weights, attention=rest[0])
    model = model.to(device=device, dtype=dtype).eval()
    if rest[-1] == "int8":
        # torch's own dynamic quantization: int8 weights, activations quantized per call (x86 fbgemm / onednn)
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


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
    # imported in the process that runs this measurement only (each side starts fresh)
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


def run_child(config: str, weights: Path, device: str, batch: int, repeats: int, out: Path) -> dict:
    """Inside a fresh process: load `config`, measure the warm-up forward's peak memory (bytes),
    time `repeats` forwards (wall and CPU seconds, minor page faults per forward), save the output
    (B, 3, 256, 256) to `out`."""
    model = build(config, weights, device)
    x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(batch)).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = forward(model, x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset_peak_rss()
        base = rss_bytes()
        y = forward(model, x)
        peak = peak_rss_bytes() - base
    torch.save(y.cpu(), out)
    wall, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        forward(model, x)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(repeats, 1)
    return {"bytes": peak, "wall": wall, "cpu": cpu, "faults": faults}


def measure(config: str, weights: Path, device: str, batch: int, repeats: int, out: Path) -> dict:
    """Run `run_child` in a fresh subprocess and return its JSON result."""
    cmd = [sys.executable, __file__, "--child", config, "--weights", str(weights), "--device", device,
           "--batches", str(batch), "--repeats", str(repeats), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {config} (batch {batch}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--weights", type=Path, help="an official-layout cpsam file (default: random weights)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    if args.child:
        result = run_child(args.child, args.weights, args.device, batches[0], args.repeats, args.out)
        print(json.dumps(result))
        return 0

    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    if not args.device.startswith("cpu") and any(c.endswith("-int8") for c in configs):
        # torch's dynamic quantization has CPU kernels only
        print(f"int8 configurations left out: they run on the CPU only (device {args.device})")
        configs = [c for c in configs if not c.endswith("-int8")]
    if "cellpose-fp32" not in configs:
        configs.insert(0, "cellpose-fp32")
    tmp = tempfile.TemporaryDirectory()
    weights = args.weights
    if weights is None:
        weights = Path(tmp.name) / "cpsam_random"
        make_reference_weights(weights)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)

    rows = []
    for batch in batches:
        results = {c: measure(c, weights, args.device, batch, args.repeats, Path(tmp.name) / f"{c}-{batch}.pt")
                   for c in configs}
        reference = torch.load(Path(tmp.name) / f"cellpose-fp32-{batch}.pt")
        base = statistics.median(results["cellpose-fp32"]["wall"])
        base_cpu = statistics.median(results["cellpose-fp32"]["cpu"])
        for c in configs:
            med, med_cpu = statistics.median(results[c]["wall"]), statistics.median(results[c]["cpu"])
            output = torch.load(Path(tmp.name) / f"{c}-{batch}.pt")
            err = float((output - reference).abs().max() / reference.abs().max())
            mem = results[c]["bytes"] / 2**20
            faults = results[c]["faults"]
            rows.append((batch, c, med, base / med, med_cpu, base_cpu / med_cpu, err, mem, faults))
            print(f"  batch {batch} {c:15s} {med:8.2f} s  x{base / med:5.2f}  cpu {med_cpu:8.2f} s  "
                  f"x{base_cpu / med_cpu:5.2f}  rel.err {err:.1e}  peak {mem:8.0f} MiB  faults {faults:.0f}",
                  flush=True)

    print(f"\nload average after the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"(wall-clock ratios are only meaningful on an otherwise idle machine; CPU-time ratios less affected)")
    print("\n| batch | model | wall s | wall speed-up | CPU s | CPU speed-up | max rel. diff | peak MiB "
          "| page faults / forward |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch, c, med, ratio, med_cpu, ratio_cpu, err, mem, faults in rows:
        print(f"| {batch} | {c} | {med:.2f} | {ratio:.2f}x | {med_cpu:.2f} | {ratio_cpu:.2f}x | {err:.1e} "
              f"| {mem:.0f} | {faults:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
