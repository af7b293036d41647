"""Benchmark cpsam.dynamics against cellpose.dynamics (same inputs, same process, CPU).

Builds 512x512 and 2048x2048 label images by tiling real annotated masks from ../shared/data
(each tile renumbered so ids stay unique), then times both directions:

* masks -> flows: `cpsam.dynamics.masks_to_flows` vs `cellpose.dynamics.masks_to_flows_gpu`
  (the function `labels_to_flows` runs, on the CPU device);
* flows -> masks: `cpsam.dynamics.flows_to_masks` vs `cellpose.dynamics.resize_and_compute_masks`
  on dP = 5 x unit flows and cellprob = +-5 (recipe 2.7), niter 200, flow-error QC on.

Agreement printed: cosine similarity of the flows inside objects, fraction of bit-identical
pixels; AP@0.5 of our masks against cellpose's and against the label image, object counts.
Our times are warm (median of --repeats runs after one warm-up call); the first call in the
process (numba cache load, or compile on a fresh machine) is printed separately.

    python -m benchmarks.bench_dynamics [--sizes 512 2048] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CPSAM_SHARED", REPO.parent / "shared"))
# dense, mostly small-object sources; every tile keeps its real annotation
SOURCES = ("he_miccai2015_cpm", "he_gbm40_emory", "fluo_nuclei_ctc_N2DL-HeLa", "fluo_nuclei_deepcell2016",
           "tissue_multiplex_neurips22", "he_cryonuseg_wip_partial")


def tiled_labels(size: int, tile: int = 256, seed: int = 0) -> np.ndarray:
    """(size, size) uint32 labels tiled from random tile x tile crops of real masks, unique ids."""
    # imported in the process that runs this measurement only (each side starts fresh)
    import fastremap
    import tifffile

    files = sorted(p for s in SOURCES for p in (SHARED / "data" / s).glob("*_masks.tif"))
    if not files:
        sys.exit(f"no masks under {SHARED / 'data'}: this benchmark needs the shared data folder")
    masks = [tifffile.imread(p) for p in files]
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size), np.uint32)
    nxt = 0
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            m = masks[rng.integers(len(masks))]
            th, tw = min(tile, size - y, m.shape[0]), min(tile, size - x, m.shape[1])
            oy, ox = rng.integers(m.shape[0] - th + 1), rng.integers(m.shape[1] - tw + 1)
            crop, _ = fastremap.renumber(np.ascontiguousarray(m[oy : oy + th, ox : ox + tw]), in_place=False)
            crop = crop.astype(np.uint32)
            out[y : y + th, x : x + tw] = np.where(crop > 0, crop + nxt, 0)
            nxt += int(crop.max())
    out, _ = fastremap.renumber(out, in_place=True)
    return out


CPU_TIMES: dict[int, float] = {}  # id(result) -> CPU seconds of the call that made it


def timed(fn, *args, **kw):
    """(result, wall seconds); the process CPU seconds (all threads) go to CPU_TIMES."""
    t, c = time.perf_counter(), time.process_time()
    r = fn(*args, **kw)
    CPU_TIMES[id(r)] = time.process_time() - c
    return r, time.perf_counter() - t


def warm_median(repeats: int, fn, *args, **kw):
    times, cpus = [], []
    for _ in range(repeats):
        r, dt = timed(fn, *args, **kw)
        times.append(dt)
        cpus.append(CPU_TIMES[id(r)])
    CPU_TIMES[id(r)] = float(np.median(cpus))
    return r, float(np.median(times))


def cpu_of(result) -> float:
    return CPU_TIMES[id(result)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both torch (cellpose) and numba (ours); 0 = library defaults")
    args = ap.parse_args(argv)

    # imported in the process that runs this measurement only (each side starts fresh)
    import torch
    from cellpose import dynamics as cpd
    from cellpose import metrics

    from cpsam import dynamics as ours

    cpu = torch.device("cpu")
    if args.threads > 0:
        # imported in the process that runs this measurement only (each side starts fresh)
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    # first calls in this process: numba loads its on-disk cache (or compiles on a fresh machine)
    small = tiled_labels(64)
    _, t_first_m2f = timed(ours.masks_to_flows, small)
    _, t_first_f2m = timed(ours.flows_to_masks, 5 * ours.masks_to_flows(small), np.where(small > 0, 5.0, -5.0))
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print(f"first call in process (numba cache load/compile): masks->flows {t_first_m2f:.2f} s, "
          f"flows->masks {t_first_f2m:.2f} s; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

    rows = []
    for size in args.sizes:
        lab = tiled_labels(size)
        n_obj = int(lab.max())
        inside = lab > 0
        # masks -> flows
        ref_out, t_ref_m2f = timed(cpd.masks_to_flows_gpu, lab.astype(np.int64), device=cpu)
        c_ref_m2f = cpu_of(ref_out)
        ref_mu = ref_out[0].astype(np.float32)
        mu, t_m2f = warm_median(args.repeats, ours.masks_to_flows, lab)
        c_m2f = cpu_of(mu)
        # cosine per object pixel; pixels where both flows are exactly zero (one-pixel objects,
        # symmetric spots) count as agreeing
        na, nb = np.linalg.norm(mu, axis=0), np.linalg.norm(ref_mu, axis=0)
        both0 = (na == 0) & (nb == 0)
        cos = np.where(both0, 1.0, (mu * ref_mu).sum(0) / np.maximum(na * nb, 1e-30))[inside]
        same = float(np.all(mu == ref_mu, axis=0)[inside].mean())
        # flows -> masks on the same (cellpose-made) flows
        dP = (5.0 * ref_mu).astype(np.float32)
        cellprob = np.where(inside, 5.0, -5.0).astype(np.float32)
        ref_masks, t_ref_f2m = timed(cpd.resize_and_compute_masks, dP, cellprob, niter=200, device=cpu)
        c_ref_f2m = cpu_of(ref_masks)
        masks, t_f2m = warm_median(args.repeats, ours.flows_to_masks, dP, cellprob, niter=200, exact=False)
        c_f2m = cpu_of(masks)
        masks_x, t_f2m_x = warm_median(args.repeats, ours.flows_to_masks, dP, cellprob, niter=200, exact=True)
        c_f2m_x = cpu_of(masks_x)
        ap_fast_exact = float(metrics.average_precision([masks_x], [masks])[0][0, 0])
        ap_ref = float(metrics.average_precision([ref_masks], [masks])[0][0, 0])
        ap_gt = float(metrics.average_precision([lab], [masks])[0][0, 0])
        ap_gt_ref = float(metrics.average_precision([lab], [ref_masks])[0][0, 0])
        rows.append(dict(size=size, n=n_obj, fg=float(inside.mean()), t_ref_m2f=t_ref_m2f, t_m2f=t_m2f,
                         cos_min=float(cos.min()), cos_mean=float(cos.mean()), same=same,
                         t_ref_f2m=t_ref_f2m, t_f2m=t_f2m, n_ref=int(ref_masks.max()), n_ours=int(masks.max()),
                         identical=bool(np.array_equal(ref_masks, masks)), ap_ref=ap_ref, ap_gt=ap_gt,
                         ap_gt_ref=ap_gt_ref, t_f2m_x=t_f2m_x, n_x=int(masks_x.max()),
                         identical_x=bool(np.array_equal(ref_masks, masks_x)), ap_fast_exact=ap_fast_exact,
                         c_ref_m2f=c_ref_m2f, c_m2f=c_m2f, c_ref_f2m=c_ref_f2m, c_f2m=c_f2m, c_f2m_x=c_f2m_x))
        print(f"done {size}x{size}", flush=True)

    print()
    print("| image | objects | direction | cellpose wall s (CPU s) | cpsam wall s (CPU s) | speed-up wall (CPU) "
          "| agreement |")
    print("|---|---|---|---|---|---|---|")

    def cells(r, ref, mine):
        tr, cr, tm, cm = r["t_" + ref], r["c_" + ref], r["t_" + mine], r["c_" + mine]
        return f"{tr:.2f} ({cr:.1f}) | {tm:.3f} ({cm:.2f}) | {tr / tm:.0f}x ({cr / cm:.0f}x)"

    for r in rows:
        img = f"{r['size']}x{r['size']}"
        print(f"| {img} | {r['n']} | masks -> flows | {cells(r, 'ref_m2f', 'm2f')} | cosine in objects min "
              f"{r['cos_min']:.6f} mean {r['cos_mean']:.6f}; bit-identical pixels {100 * r['same']:.2f} % |")
        print(f"| {img} | {r['n']} | flows -> masks (exact=False) | {cells(r, 'ref_f2m', 'f2m')} | AP@0.5 vs "
              f"cellpose {r['ap_ref']:.4f}; objects {r['n_ours']} vs {r['n_ref']}; masks identical: "
              f"{r['identical']}; AP@0.5 vs labels ours {r['ap_gt']:.4f} / cellpose {r['ap_gt_ref']:.4f} |")
        print(f"| {img} | {r['n']} | flows -> masks (default, exact) | {cells(r, 'ref_f2m', 'f2m_x')} | masks "
              f"identical to cellpose: {r['identical_x']}; objects {r['n_x']}; AP@0.5 exact=False vs exact "
              f"{r['ap_fast_exact']:.4f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (machine shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
