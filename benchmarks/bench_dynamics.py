"""Benchmark cpsam.dynamics against cellpose.dynamics (same inputs, CPU), each side in a fresh process.

Builds 512x512 and 2048x2048 label images by tiling real annotated masks from ../shared/data
(each tile renumbered so ids stay unique), then times both directions:

* masks -> flows: `cpsam.dynamics.masks_to_flows` vs `cellpose.dynamics.masks_to_flows_gpu`
  (the function `labels_to_flows` runs, on the CPU device);
* flows -> masks: `cpsam.dynamics.flows_to_masks` vs `cellpose.dynamics.resize_and_compute_masks`
  on dP = 5 x cellpose's unit flows and cellprob = +-5 (recipe 2.7), niter 200, flow-error QC on.

Each side runs in its own fresh Python process (cellpose first: it writes the flows both sides
then turn into masks), one warm-up call, then the median of --repeats timed calls. Printed:
wall and CPU seconds, the ratios, whether our masks are identical to cellpose's (labels
included) and our flows bit-identical; where our flows -> masks spends its time (per stage);
the floor, one numba pass that reads the flow field once; and the first-call cost of our kernels
in a fresh process twice: with an empty numba cache (compile, as on a new machine) and with the
cache that compile wrote (load).

    python -m benchmarks.bench_dynamics [--sizes 512 2048] [--repeats 3] [--ref-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def timed(fn, *args, **kw) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds of all threads)."""
    t, c = time.perf_counter(), time.process_time()
    r = fn(*args, **kw)
    return r, time.perf_counter() - t, time.process_time() - c


def median_of(repeats: int, fn, *args, **kw) -> tuple[object, float, float]:
    """Result and median wall / CPU seconds of `repeats` calls."""
    runs = [timed(fn, *args, **kw) for _ in range(max(1, repeats))]
    return runs[-1][0], float(np.median([r[1] for r in runs])), float(np.median([r[2] for r in runs]))


def _read_field_once(dP: np.ndarray) -> float:
    """The floor of flows -> masks: one numba pass that reads every value of the flow field."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def total(a):
        s = 0.0
        for i in prange(a.shape[1]):
            for j in range(a.shape[2]):
                s += abs(a[0, i, j]) + abs(a[1, i, j])
        return s

    total(dP[:, :8, :8])
    return median_of(5, total, dP)[1]


def _stages(dP: np.ndarray, cellprob: np.ndarray, repeats: int) -> dict[str, float]:
    """Median wall seconds of each stage of `cpsam.dynamics.flows_to_masks` (default arguments)."""
    # imported in the process that runs this measurement only (each side starts fresh)
    from cpsam import dynamics as ours

    runs: dict[str, list[float]] = {}
    for _ in range(max(1, repeats)):
        fg, t_fg, _ = timed(np.greater, cellprob, 0.0)
        pos, t_int, _ = timed(ours.follow_flows, dP, fg, 200)
        masks, t_seed, _ = timed(ours.get_masks, pos, fg)
        err, t_qc, _ = timed(ours.flow_error, masks, dP)
        masks = ours.fastremap.mask(masks, 1 + np.nonzero(err > 0.4)[0])
        ours.fastremap.renumber(masks, in_place=True)
        _, t_fill, _ = timed(ours.fill_holes_and_remove_small_masks, masks.astype(np.uint16), 15)
        for k, v in (("foreground", t_fg), ("Euler integration", t_int), ("seeds + growth", t_seed),
                     ("flow-error QC", t_qc), ("fill holes + small masks", t_fill)):
            runs.setdefault(k, []).append(v)
    return {k: float(np.median(v)) for k, v in runs.items()}


def worker(side: str, work: Path, sizes: list[int], repeats: int) -> None:
    """One side in this (fresh) process; times and outputs go to WORK/SIDE.json and .npy files."""
    res: dict[str, object] = {"threads": None}
    if side == "cellpose":
        # imported in the process that runs this measurement only (each side starts fresh)
        import torch
        from cellpose import dynamics as cpd

        cpu = torch.device("cpu")
        res["threads"] = torch.get_num_threads()
        small = np.load(work / "lab_64.npy").astype(np.int64)
        cpd.resize_and_compute_masks(5 * cpd.masks_to_flows_gpu(small, device=cpu)[0].astype(np.float32),
                                     np.where(small > 0, 5.0, -5.0).astype(np.float32), niter=200, device=cpu)
        for size in sizes:
            lab = np.load(work / f"lab_{size}.npy").astype(np.int64)
            out, res[f"m2f_{size}"], res[f"m2f_{size}_cpu"] = median_of(repeats, cpd.masks_to_flows_gpu, lab,
                                                                          device=cpu)
            mu = out[0].astype(np.float32)
            np.save(work / f"cellpose_flows_{size}.npy", mu)
            dP, cp = (5.0 * mu).astype(np.float32), np.where(lab > 0, 5.0, -5.0).astype(np.float32)
            masks, res[f"f2m_{size}"], res[f"f2m_{size}_cpu"] = median_of(
                repeats, cpd.resize_and_compute_masks, dP, cp, niter=200, device=cpu)
            np.save(work / f"cellpose_masks_{size}.npy", masks)
    elif side in ("ours", "first"):
        import numba

        from cpsam import dynamics as ours

        res["threads"] = numba.get_num_threads()
        small = np.load(work / "lab_64.npy")
        _, res["first_m2f"], _ = timed(ours.masks_to_flows, small)
        _, res["first_f2m"], _ = timed(ours.flows_to_masks, 5 * ours.masks_to_flows(small),
                                       np.where(small > 0, 5.0, -5.0).astype(np.float32))
        for size in sizes if side == "ours" else []:
            lab = np.load(work / f"lab_{size}.npy")
            mu, res[f"m2f_{size}"], res[f"m2f_{size}_cpu"] = median_of(repeats, ours.masks_to_flows, lab)
            np.save(work / f"ours_flows_{size}.npy", mu)
            dP = (5.0 * np.load(work / f"cellpose_flows_{size}.npy")).astype(np.float32)
            cp = np.where(lab > 0, 5.0, -5.0).astype(np.float32)
            for tag, exact in (("f2m_", True), ("fast_", False)):
                masks, res[f"{tag}{size}"], res[f"{tag}{size}_cpu"] = median_of(
                    repeats, ours.flows_to_masks, dP, cp, niter=200, exact=exact)
                np.save(work / f"ours_{tag}masks_{size}.npy", masks)
            res[f"stages_{size}"] = _stages(dP, cp, repeats)
            res[f"floor_{size}"] = _read_field_once(dP)
    (work / f"{side}.json").write_text(json.dumps(res))


def _run(side: str, work: Path, sizes: list[int], repeats: int, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_dynamics", "--worker", side, "--work", str(work),
           "--repeats", str(repeats), "--sizes", *map(str, sizes)]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})
    return json.loads((work / f"{side}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of ours (median)")
    ap.add_argument("--ref-repeats", type=int, default=3, help="timed calls of cellpose (median)")
    ap.add_argument("--worker", choices=["cellpose", "ours", "first"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.work, args.sizes, args.repeats)
        return 0

    # imported here: the parent only compares outputs
    from cellpose import metrics

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (machine shared)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_dynamics_") as tmp:
        work = Path(tmp)
        for size in [64, *args.sizes]:
            np.save(work / f"lab_{size}.npy", tiled_labels(size))
        # first calls: an empty numba cache (compile, as on a new machine), then the cache it wrote
        cache = {"NUMBA_CACHE_DIR": str(work / "numba_cache")}
        steps = (("first", 1, cache, "first calls, empty numba cache"), ("first", 1, cache, "first calls, cached"),
                 ("cellpose", args.ref_repeats, None, "cellpose"), ("ours", args.repeats, None, "ours"))
        results = []
        for side, repeats, env, what in steps:  # minutes in all at 2048²: say what runs
            t0 = time.perf_counter()
            print(f"running {what} (fresh process) ...", flush=True)
            results.append(_run(side, work, args.sizes, repeats, env))
            print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        cold, warm, ref, ours = results
        print(f"\nthreads: cellpose (torch) {ref['threads']}, ours (numba) {ours['threads']}; "
              f"median of {args.ref_repeats} (cellpose) / {args.repeats} (ours) calls after one warm-up, each "
              "side in a fresh process")
        print(f"first call in a fresh process, empty numba cache (compile): masks->flows {cold['first_m2f']:.2f} s,"
              f" flows->masks {cold['first_f2m']:.2f} s; with the cache (load): masks->flows "
              f"{warm['first_m2f']:.2f} s, flows->masks {warm['first_f2m']:.2f} s\n")
        print("| image | objects | direction | cellpose wall s (CPU s) | cpsam wall s (CPU s) | speed-up wall (CPU) "
              "| agreement |")
        print("|---|---|---|---|---|---|---|")

        def cells(key: str, mine: str) -> str:
            tr, cr, tm, cm = ref[key], ref[key + "_cpu"], ours[mine], ours[mine + "_cpu"]
            return f"{tr:.2f} ({cr:.1f}) | {tm:.3f} ({cm:.2f}) | {tr / tm:.1f}x ({cr / cm:.1f}x)"

        stages = []
        for size in args.sizes:
            lab = np.load(work / f"lab_{size}.npy")
            n, img = int(lab.max()), f"{size}x{size}"
            inside = lab > 0
            same = float(np.all(np.load(work / f"ours_flows_{size}.npy") == np.load(
                work / f"cellpose_flows_{size}.npy"), axis=0)[inside].mean())
            ref_m = np.load(work / f"cellpose_masks_{size}.npy")
            exact_m = np.load(work / f"ours_f2m_masks_{size}.npy")
            fast_m = np.load(work / f"ours_fast_masks_{size}.npy")
            ap_fast = float(metrics.average_precision([ref_m], [fast_m])[0][0, 0])
            print(f"| {img} | {n} | masks -> flows | {cells(f'm2f_{size}', f'm2f_{size}')} | bit-identical pixels "
                  f"{100 * same:.2f} % |")
            print(f"| {img} | {n} | flows -> masks (default, exact) | {cells(f'f2m_{size}', f'f2m_{size}')} | "
                  f"masks identical to cellpose: {bool(np.array_equal(ref_m, exact_m))}; objects {int(exact_m.max())} "
                  f"vs {int(ref_m.max())} |")
            print(f"| {img} | {n} | flows -> masks (exact=False) | {cells(f'f2m_{size}', f'fast_{size}')} | "
                  f"AP@0.5 vs cellpose {ap_fast:.4f}; objects {int(fast_m.max())} |")
            stages.append((img, int(inside.sum()), ours[f"stages_{size}"], ours[f"f2m_{size}"], ours[f"floor_{size}"]))
        print("\nwhere our flows -> masks (exact) spends its wall time, median per stage:\n")
        for img, nfg, st, total, floor in stages:
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in st.items())
            print(f"- {img} ({nfg} foreground pixels): {parts}; whole call {total:.3f} s; floor (one numba pass "
                  f"reading the flow field) {floor:.4f} s = {total / floor:.0f}x below the whole call")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (machine shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
