"""The Cellpose flow algebra: label masks -> unit flows, and network flows -> label masks.

Two rule sets, each implemented once for the CPU (numba) and once in torch:
* rules="cp4" (default): `cellpose.dynamics` 4.2.1.1 (recipe sections 2.5-2.7 and 3.1).
* rules="cp3": what cellpose 3.1.1.2 computes on a CPU (its classic-model masks): Euler steps in
  pixel coordinates with its own bilinear sampler, a per-object flow-error diffusion (own source,
  iteration count and 1/9 factor), no renumbering after the QC and its rank-based size filter.

Modules: `flows_numba` (labels -> unit flows, cp4, numba), `masks_cp4` / `masks_cp3` (flows ->
masks kernels of each rule set, numba; one SIMD-lane Euler kernel serves both), `labels_numba`
(counts, renumbering and hole filling of the masks' tail, numba), `torch_rules` (both rule sets
in torch ops, any device, TorchScript-compatible; also compiled into `cpsam distill export`
files). device=None / "cpu" runs numba, any other torch device (e.g. "cuda") `torch_rules`, under
either rule set; the two give the same masks (tests/cpsam/test_dynamics_parity.py).

Conventions: flows are (2, H, W) [dY, dX]. `masks_to_flows` returns *unit* flows (training
targets are 5x these); `flows_to_masks` takes the network's flows at 5x scale and its
cell-probability logits, exactly like `cellpose.dynamics.resize_and_compute_masks`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fastremap
import numba
import numpy as np
import torch
from tqdm import tqdm

from cpsam.dynamics import flows_numba, labels_numba, masks_cp3, masks_cp4, torch_rules
from cpsam.io import read_labels, write_tiff

__all__ = [
    "masks_to_flows",
    "masks_to_flows_many",
    "write_flow_cache",
    "flows_to_masks",
    "flows_to_masks_batch",
    "flows_to_masks_thresholds",
    "flow_error",
    "fill_holes_and_remove_small_masks",
    "follow_flows",
    "get_masks",
]


RULES = ("cp4", "cp3")


def _check_rules(rules: str) -> str:
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    return rules


def _on_torch(device: str | torch.device | None) -> torch.device | None:
    """The torch device that runs `torch_rules`, or None for the numba CPU kernels (None / "cpu")."""
    if device is None:
        return None
    dev = torch.device(device)
    return None if dev.type == "cpu" else dev


def _check_labels(masks: np.ndarray, name: str = "masks") -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) label image, got shape {masks.shape}")
    if masks.dtype == np.bool_ or not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype (labels, 0 = background), got {masks.dtype}")
    if masks.size and masks.min() < 0:
        raise ValueError(f"{name} has negative labels (min {masks.min()}); labels must be >= 0")
    return masks


def _consecutive(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """int32 copy of `masks` renumbered 1..n in order of first appearance, and n."""
    if masks.size == 0:
        return np.zeros(masks.shape, np.int32), 0
    lab, remap = fastremap.renumber(np.ascontiguousarray(masks), in_place=False, preserve_zero=True)
    n = len(remap) - (1 if 0 in remap else 0)
    return lab.astype(np.int32, copy=False), int(n)


def _unit_flows(lab: np.ndarray, n: int, device: torch.device | None, rules: str) -> np.ndarray:
    """float64 (2, H, W) unit flows of int32 labels 1..n (numba for device None, else torch_rules)."""
    if n == 0:
        return np.zeros((2, *lab.shape), np.float64)
    if device is not None:
        lab_t = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64)).to(device)
        return torch_rules.unit_flows(lab_t, n, rules == "cp3").double().cpu().numpy()
    if rules == "cp3":
        return masks_cp3.unit_flows(lab, n)
    return flows_numba.flows_numba(lab, n)


def masks_to_flows(
    masks: np.ndarray, *, device: str | torch.device | None = None, rules: str = "cp4"
) -> np.ndarray:
    """Unit flows of a label image, as Cellpose's `masks_to_flows` computes them.

    masks: (H, W) integer labels, 0 = background; ids need not be consecutive (any integer dtype
    up to uint32/int64), objects may touch the border or be split in several pieces.
    device: None/"cpu" runs the numba CPU kernels; another torch device ("cuda") runs
    `torch_rules.unit_flows` there. Returns (2, H, W) float32 [dY, dX], unit length on objects,
    0 on background.
    rules: "cp4" = cellpose 4 (one global iteration count 2 * max(h + w + 2), source at the
    rounded mean); "cp3" = cellpose 3's CPU `masks_to_flows_cpu` (each object diffused on its own
    for 2 * (h + w + 4) iterations from its pixel nearest to the mean, (1/9) * sum).
    Raises ValueError for a non-2-D or non-integer array or unknown rules.
    """
    masks = _check_labels(masks)
    _check_rules(rules)
    lab, n = _consecutive(masks)
    return _unit_flows(lab, n, _on_torch(device), rules).astype(np.float32)


def _flows_worker(masks: np.ndarray) -> np.ndarray:
    return masks_to_flows(masks)


def _cache_worker(job: tuple[str, str]) -> str:
    src, dst = job
    flows = masks_to_flows(read_labels(src))
    write_tiff(dst, flows, photometric="minisblack")
    return dst


def _worker_init() -> None:
    numba.set_num_threads(1)
    torch.set_num_threads(1)


def _pool_map(fn, items: Sequence, workers: int, progress: bool, desc: str) -> list:
    workers = max(1, int(workers))
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, disable=not progress)]
    # spawn, not fork: numba's thread pool and torch's OpenMP are not fork-safe
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress))


def masks_to_flows_many(
    masks_list: Sequence[np.ndarray], workers: int = 1, progress: bool = True
) -> list[np.ndarray]:
    """`masks_to_flows` for many label images in `workers` processes, with a tqdm bar.

    Returns a list of (2, H_i, W_i) float32 unit flows in input order.
    """
    return _pool_map(_flows_worker, list(masks_list), workers, progress, "flows")


def write_flow_cache(
    mask_paths: Sequence[str | os.PathLike[str]],
    out_paths: Sequence[str | os.PathLike[str]],
    workers: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Read every label image, compute its unit flows and write them as float32 (2, H, W) [dY, dX]
    TIFFs (atomically: temporary name, then rename), in `workers` processes with a tqdm bar.

    A bad label file raises `cpsam.io.InputFileError` naming it. Returns the written paths.
    """
    if len(mask_paths) != len(out_paths):
        raise ValueError(f"{len(mask_paths)} mask paths but {len(out_paths)} output paths")
    jobs = [(str(a), str(b)) for a, b in zip(mask_paths, out_paths, strict=True)]
    return [Path(p) for p in _pool_map(_cache_worker, jobs, workers, progress, "flow cache")]


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int = 15, *, rules: str = "cp4") -> np.ndarray:
    """Drop masks under `min_size` pixels, fill holes of each mask, drop small ones again.

    masks: (H, W) integer labels (not modified). Returns a new (H, W) array of the same dtype,
    labels renumbered 1..N; a mask whose hole holds another mask absorbs it, as in cellpose.
    min_size <= 0 skips the size filter and only fills holes (labels still compacted).
    Behaviour of `cellpose.utils.fill_holes_and_remove_small_masks`: rules="cp4" as cellpose 4.2;
    rules="cp3" as cellpose 3.1, whose size filter assumes labels 1..N and a background pixel: it
    removes label k + 1 when the k-th present label (in sorted order, after the smallest value)
    is under min_size. With gaps in the labels (cellpose 3 leaves the flow-QC gaps) that is a
    neighbouring label; we reproduce it for compatibility.
    """
    masks = _check_labels(masks)
    _check_rules(rules)
    masks = np.ascontiguousarray(masks).copy()
    if masks.size == 0:
        return masks
    flat = masks.reshape(-1)
    values, counts, code = _present_labels(flat)
    keep = values != 0
    if min_size > 0:
        n = _renumber_kept(flat, code, keep & _large_enough(values, counts, min_size, rules))
    else:  # cellpose's fill loop then numbers the labels in value order, without renumbering after
        rank = np.zeros(int(code.max()) + 1, flat.dtype)
        rank[code[keep]] = np.arange(1, int(keep.sum()) + 1)
        labels_numba.apply_table(flat, rank)
        n = int(keep.sum())
    labels_numba.fill_holes_in_order(masks, n)
    if min_size > 0:
        values, counts, code = _present_labels(flat)
        _renumber_kept(flat, code, (values != 0) & _large_enough(values, counts, min_size, rules))
    return masks


def _present_labels(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Present values of 1-D labels `flat` (sorted), their pixel counts and the value each now has.

    Sparse labels (a value above flat.size) are first compacted in place to 0, 1, 2 ... in value
    order (0 stays 0), which keeps value order and first-appearance order.
    """
    top = int(flat.max())
    if top <= flat.size:
        all_counts = labels_numba.label_counts(flat, top)
        values = np.nonzero(all_counts)[0]
        return values, all_counts[values], values
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    shift = int(values[0] != 0)
    flat[:] = inverse.reshape(-1) + shift
    return values, counts, np.arange(len(values)) + shift


def _large_enough(values: np.ndarray, counts: np.ndarray, min_size: int, rules: str) -> np.ndarray:
    """Which present values survive the size filter of `rules` (see fill_holes_and_remove_small_masks)."""
    if rules == "cp3":  # the k-th present value after the smallest names label k + 1
        return ~np.isin(values, np.nonzero(counts[1:] < min_size)[0] + 1)
    return counts >= min_size


def _renumber_kept(flat: np.ndarray, code: np.ndarray, keep: np.ndarray) -> int:
    """Drop the present labels not kept, renumber the rest 1..n by first appearance; returns n."""
    table = np.zeros(int(code.max()) + 1, np.bool_)
    table[code[keep]] = True
    return labels_numba.renumber_kept(flat, table)


# A trajectory stops early when `_SETTLE` x its remaining geometric drift is below its distance
# to the nearest pixel edge (exact=False); exact=True only stops at exact fixed points/cycles.
_SETTLE = 4.0


def follow_flows(
    dP: np.ndarray, fg: np.ndarray, niter: int = 200, *, exact: bool = True, rules: str = "cp4"
) -> np.ndarray:
    """Euler-integrate the foreground pixels through the network flows.

    dP: (2, H, W) flows at 5x scale; fg: (H, W) bool. Returns (2, N) int32 truncated final [y, x]
    pixel positions of the N foreground pixels in row-major order (the reference's `p_final`).
    exact=True gives the reference's positions bit for bit; exact=False stops trajectories whose
    truncated position has settled (not bit-exact: a trajectory may end one bin away).
    rules: "cp4" steps in [-1, 1] grid coordinates as torch `grid_sample` (cellpose 4, see
    `masks_cp4`); "cp3" steps in pixel coordinates, clamped to [0, L - 1], with cellpose 3's CPU
    bilinear sampler (its mixed float32/float64 precision, see `masks_cp3`). numba, CPU.
    """
    settle = 0.0 if exact else _SETTLE
    if _check_rules(rules) == "cp3":
        return masks_cp3.integrate(dP, fg, niter, settle=settle)
    return masks_cp4.integrate_numba(dP, fg, niter, settle=settle)


def get_masks(pos: np.ndarray, fg: np.ndarray, max_size_fraction: float = 0.4) -> np.ndarray:
    """Labels (H, W) uint32 from final positions `pos` (2, N) of the foreground pixels `fg`.

    Histogram seeding and growth as cellpose's `get_masks_torch`, then labels covering more than
    `max_size_fraction` of the image are removed; renumbered 1..N in order of first appearance.
    """
    h, w = fg.shape
    seed_lab, n_seeds = masks_cp4.labels_from_positions(pos, (h, w))
    # the foreground pixels are in row-major order, so first appearance among them is the image's
    counts = labels_numba.label_counts(seed_lab, n_seeds)
    labels_numba.renumber_kept(seed_lab, ~(counts > h * w * max_size_fraction))
    out = np.zeros((h, w), np.uint32)
    out[fg] = seed_lab
    return out


def flow_error(
    masks: np.ndarray, dP: np.ndarray, *, device: str | torch.device | None = None, rules: str = "cp4"
) -> np.ndarray:
    """Mean squared error per mask between the flows of `masks` and the network's flows.

    masks: (H, W) labels 1..N (consecutive); dP: (2, H, W) network flows at 5x scale.
    Returns (N,) float64: mean over each mask's pixels of sum_c (mu_c - dP_c / 5)^2 where mu are
    the unit flows re-diffused from `masks` (cellpose's `dynamics.flow_error`) under `rules`
    (see `masks_to_flows`); an absent label gives 0 ("cp4") or nan ("cp3", as cellpose 3).
    device: None/"cpu" numba, another torch device `torch_rules.flow_errors` there.
    """
    masks = _check_labels(masks)
    _check_rules(rules)
    if dP.shape[1:] != masks.shape:
        raise ValueError(f"dP has shape {dP.shape}, masks {masks.shape}: need dP (2, H, W)")
    lab = np.ascontiguousarray(masks, dtype=np.int32)
    n = int(lab.max()) if lab.size else 0
    if n == 0:
        return np.zeros(0, np.float64)
    dev = _on_torch(device)
    if dev is not None:
        err = torch_rules.flow_errors(torch.from_numpy(lab.astype(np.int64)).to(dev),
                                      torch.from_numpy(np.asarray(dP, np.float32)).to(dev), n, rules == "cp3")
        return err.double().cpu().numpy()
    if rules == "cp3":
        return masks_cp3.flow_errors(lab, n, dP)
    return flows_numba.flow_errors(lab, n, dP)


def _finish(
    masks: np.ndarray,
    dP: np.ndarray,
    flow_threshold: float,
    min_size: int,
    rules: str = "cp4",
) -> np.ndarray:
    """Flow-error QC, dtype, hole filling and size filter (the tail of compute_masks).

    `masks` (from `get_masks`) may be modified in place. cellpose 3 does not renumber after the
    QC (its size filter then works on labels with gaps).
    """
    if masks.max() > 0 and flow_threshold is not None and flow_threshold > 0:
        err = flow_error(masks, dP, rules=rules)
        bad = err > flow_threshold
        if rules == "cp4":  # drop the bad masks and renumber by first appearance (fastremap.mask + renumber)
            masks = np.ascontiguousarray(masks)
            labels_numba.renumber_kept(masks.reshape(-1), np.concatenate([[False], ~bad]))
        elif bad.any():
            masks = fastremap.mask(masks, 1 + np.nonzero(bad)[0])
    masks = masks.astype(np.uint16 if masks.max() < 2**16 else np.uint32)
    return fill_holes_and_remove_small_masks(masks, min_size=min_size, rules=rules)


def _check_flows(dP: np.ndarray, cellprob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    if cellprob.ndim != 2 or dP.shape != (2, *cellprob.shape):
        raise ValueError(f"need dP (2, H, W) and cellprob (H, W); got {dP.shape} and {cellprob.shape}")
    return dP.astype(np.float32, copy=False), cellprob


def flows_to_masks(
    dP: np.ndarray,
    cellprob: np.ndarray,
    *,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    device: str | torch.device | None = None,
    exact: bool = True,
    rules: str = "cp4",
) -> np.ndarray:
    """Label masks from network outputs, as `cellpose.dynamics.resize_and_compute_masks`.

    dP: (2, H, W) float flows [dY, dX] at the network's 5x scale; cellprob: (H, W) logits.
    Pixels with cellprob > cellprob_threshold are integrated for `niter` Euler steps, seeded and
    grown; masks larger than max_size_fraction * H * W are removed; masks whose mean squared flow
    error exceeds flow_threshold are removed (0 disables); holes are filled and masks under
    min_size pixels removed. device: None/"cpu" uses numba; another torch device ("cuda") runs
    `torch_rules` there (same masks, see `flows_to_masks_batch`).
    exact=True (default) reproduces the reference's masks bit for bit (labels included).
    exact=False (numba path only) stops Euler trajectories one at a time once their final pixel
    looks settled (see `follow_flows`): not bit-exact, a trajectory may end one bin away, which can
    change masks. It is kept for compatibility: the exact default, which advances trajectories in
    SIMD lanes, is now the faster of the two (docs/results/dynamics.md). The torch path is always
    exact.
    rules: "cp4" = cellpose 4.2.1.1; "cp3" = cellpose 3.1.1.2 on a CPU (its classic-model
    masks): pixel-coordinate Euler steps with its own bilinear sampler, per-object flow-error
    diffusion, no renumbering after the QC and its rank-based size filter (see `masks_cp3`).
    Seeding is the same in both.
    Returns (H, W) uint16 labels 1..N (uint32 above 65535 masks).
    """
    _check_rules(rules)
    if _on_torch(device) is not None:
        return flows_to_masks_batch(
            [dP], [cellprob], niter=niter, cellprob_threshold=cellprob_threshold,
            flow_threshold=flow_threshold, min_size=min_size, max_size_fraction=max_size_fraction,
            device=device, rules=rules,
        )[0]
    dP, cellprob = _check_flows(dP, cellprob)
    masks = _masks_before_qc(dP, cellprob, niter, cellprob_threshold, max_size_fraction, exact, rules)
    return _finish(masks, dP, flow_threshold, min_size, rules)


def _masks_before_qc(
    dP: np.ndarray, cellprob: np.ndarray, niter: int, cellprob_threshold: float, max_size_fraction: float,
    exact: bool, rules: str,
) -> np.ndarray:
    """The numba path up to the flow-error QC: foreground pixels followed for `niter` Euler steps, seeded and
    grown (`get_masks`); all zeros (uint16) without foreground, which `_finish` passes through."""
    fg = cellprob > cellprob_threshold
    if not fg.any():
        return np.zeros(cellprob.shape, np.uint16)
    return get_masks(follow_flows(dP, fg, niter, exact=exact, rules=rules), fg, max_size_fraction)


def flows_to_masks_thresholds(
    dP: np.ndarray,
    cellprob: np.ndarray,
    flow_thresholds: Sequence[float],
    *,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    rules: str = "cp4",
) -> list[np.ndarray]:
    """`flows_to_masks` (numba CPU path, exact) under each of `flow_thresholds`, the Euler steps and the seeding
    run once: element k equals flows_to_masks(dP, cellprob, flow_threshold=flow_thresholds[k], ...) (the same
    steps; only the flow-error QC and what follows it run per threshold). For choosing a threshold."""
    _check_rules(rules)
    dP, cellprob = _check_flows(dP, cellprob)
    masks = _masks_before_qc(dP, cellprob, niter, cellprob_threshold, max_size_fraction, True, rules)
    return [_finish(masks.copy(), dP, float(t), min_size, rules) for t in flow_thresholds]


def flows_to_masks_batch(
    dPs: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    cellprobs: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    *,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    device: str | torch.device | None = None,
    exact: bool = True,
    rules: str = "cp4",
) -> list[np.ndarray]:
    """`flows_to_masks` for many images/tiles: dPs B x (2, H_i, W_i), cellprobs B x (H_i, W_i).

    device None: numba on CPU, one image after the other (each kernel uses all cores).
    device given (e.g. "cuda", or "cpu" for the torch code on CPU): `torch_rules` on that device
    under either rule set, the Euler steps batched over images of equal size (always all niter
    steps, as cellpose), seeding, QC, hole filling and size filter per image. `exact` applies to
    the numba path (see `flows_to_masks`). Returns a list of (H_i, W_i) uint16 labels (uint32
    above 65535 masks).
    """
    n = len(dPs)
    if len(cellprobs) != n:
        raise ValueError(f"{n} flow fields but {len(cellprobs)} cell-probability maps")
    _check_rules(rules)
    kw = dict(niter=niter, cellprob_threshold=cellprob_threshold, flow_threshold=flow_threshold,
              min_size=min_size, max_size_fraction=max_size_fraction)
    if device is None:
        return [flows_to_masks(_np(dPs[i]), _np(cellprobs[i]), exact=exact, rules=rules, **kw) for i in range(n)]
    dev = torch.device(device)
    qc = float(flow_threshold) if flow_threshold is not None else 0.0
    items = [_check_flows(_np(dPs[i]), _np(cellprobs[i])) for i in range(n)]
    out: list[np.ndarray | None] = [None] * n
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (_, cp) in enumerate(items):
        by_shape.setdefault(cp.shape, []).append(i)
    for shape, idx in by_shape.items():
        dP_t = torch.from_numpy(np.stack([items[i][0] for i in idx])).to(dev)
        fg_t = torch.from_numpy(np.stack([items[i][1] > cellprob_threshold for i in idx])).to(dev)
        if not bool(fg_t.any()):
            for i in idx:
                out[i] = np.zeros(shape, np.uint16)
            continue
        if rules == "cp3":
            positions = [torch_rules.euler_cp3(dP_t[k], fg_t[k], niter) for k in range(len(idx))]
        else:
            positions = torch_rules.euler_cp4(dP_t, fg_t, niter)
        for k, i in enumerate(idx):
            if not bool(fg_t[k].any()):
                out[i] = np.zeros(shape, np.uint16)
                continue
            masks = torch_rules.masks_from_positions(positions[k], dP_t[k], fg_t[k], qc, min_size,
                                                     max_size_fraction, rules)
            out[i] = _label_array(masks)
    return out  # type: ignore[return-value]


def _label_array(masks: torch.Tensor) -> np.ndarray:
    """(H, W) int64 tensor of labels -> numpy uint16 (uint32 above 65535 labels), as `_finish`."""
    m = masks.cpu().numpy()
    return m.astype(np.uint16 if m.size == 0 or m.max() < 2**16 else np.uint32)


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
