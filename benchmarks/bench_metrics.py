"""Benchmark: our metrics vs `cellpose.metrics` on a 2048x2048 pair with ~2000 objects per side.

The ground truth is a mosaic of real manual masks (CTC Fluo-N2DL-HeLa frames from
`shared/data`), every tile's ids offset so they stay unique; the prediction is a perturbed copy
(shifted by 1 px, 5 % of objects dropped, 5 % split in two, ids shuffled to non-consecutive
values), so the overlap graph has real multi-object components.

    python -m benchmarks.bench_metrics [--data ../shared/data] [--repeats 3]

Prints one line per method (best-of-N wall time) and the speed ratio; checks the counts agree.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cpsam.io import read_labels

HELA_DIR = "fluo_nuclei_ctc_N2DL-HeLa"
HELA_FRAMES = ("Fluo-N2DL-HeLa_02_t075_masks.tif", "Fluo-N2DL-HeLa_02_t079_masks.tif")


def mosaic_labels(tiles: list[np.ndarray], size: int = 2048) -> np.ndarray:
    """Tile label images row-major into a (size, size) uint32 mosaic with unique ids per tile."""
    out = np.zeros((size, size), np.uint32)
    y = x = row_h = 0
    offset = k = 0
    while y < size:
        tile = tiles[k % len(tiles)].astype(np.uint32)
        k += 1
        h, w = min(tile.shape[0], size - y), min(tile.shape[1], size - x)
        crop = tile[:h, :w]
        out[y : y + h, x : x + w] = np.where(crop > 0, crop + offset, 0)
        offset += int(tile.max())
        row_h = max(row_h, h)
        x += w
        if x >= size:
            x, y, row_h = 0, y + row_h, 0
    return out


def perturb_labels(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible 'prediction': shift, drop 5 %, split 5 % along their centroid column, shuffle ids."""
    rng = np.random.default_rng(seed)
    pred = np.roll(labels, (1, 0), axis=(0, 1)).astype(np.int64)
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, ids.size // 20, replace=False))] = 0
    split = rng.choice(ids, ids.size // 20, replace=False)
    top = int(ids.max())
    ys, xs = np.nonzero(np.isin(pred, split))
    lab = pred[ys, xs]
    cx = np.bincount(lab, weights=xs, minlength=top + 1) / np.maximum(np.bincount(lab, minlength=top + 1), 1)
    right = xs > cx[lab]
    pred[ys[right], xs[right]] = lab[right] + top
    present = np.unique(pred)[1:]
    lut = np.zeros(int(pred.max()) + 1, np.int64)
    lut[present] = rng.choice(np.arange(1, 4 * present.size), present.size, replace=False)
    return lut[pred].astype(np.uint32)


def build_case(data_dir: Path, size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction), both (size, size) uint32, from the HeLa frames in `data_dir`."""
    tiles = [read_labels(data_dir / HELA_DIR / name) for name in HELA_FRAMES]
    gt = mosaic_labels(tiles, size)
    return gt, perturb_labels(gt)


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time in seconds over `repeats` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per method plus the ratio."""
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=repo.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    # imported in the process that runs this measurement only (each side starts fresh)
    from cellpose import metrics as cp_metrics

    from cpsam.metrics import average_precision, score_image

    gt, pred = build_case(args.data)
    n_gt, n_pred = len(np.unique(gt)) - 1, len(np.unique(pred)) - 1
    print(
        f"case: {gt.shape[0]}x{gt.shape[1]}, {n_gt} ground-truth objects, "
        f"{n_pred} predicted (ids up to {pred.max()})"
    )
    thresholds = [0.5, 0.75, 0.9]
    t_ours, ours = best_time(lambda: average_precision(gt, pred, thresholds), args.repeats)
    t_full, _ = best_time(lambda: score_image(gt, pred, thresholds), args.repeats)
    gt64, pred64 = gt.astype(np.int64), pred.astype(np.int64)  # cellpose's sparse table needs signed ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_cp, theirs = best_time(lambda: cp_metrics.average_precision(gt64, pred64, thresholds), args.repeats)
    same = all(
        np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        for a, b in zip(ours[1:], theirs[1:], strict=True)
    )
    print(
        f"AP@{thresholds} ours {np.round(ours[0], 4).tolist()} "
        f"cellpose {np.round(np.asarray(theirs[0], np.float64), 4).tolist()}; TP/FP/FN identical: {same}"
    )
    print(f"eval.metrics.average_precision        {t_ours * 1e3:8.1f} ms")
    print(f"eval.metrics.score_image (all metrics) {t_full * 1e3:8.1f} ms")
    print(f"cellpose.metrics.average_precision     {t_cp * 1e3:8.1f} ms")
    print(f"speed-up (cellpose / ours, AP only): {t_cp / t_ours:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
