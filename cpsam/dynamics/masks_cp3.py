"""Flows -> labels under the cellpose 3 rules: numba kernels for `cpsam.dynamics` rules="cp3".

Kernels behind `cpsam.dynamics` rules="cp3" on the CPU (the public API is there); the same rules
in torch ops are `cpsam.dynamics.torch_rules`. Inputs as `masks_cp4`: dP (2, H, W) float32 flows
at 5x scale, fg (H, W) bool, labels (H, W) int32; positions (2, N) int32 [y, x].

Rules copied from cellpose 3.1.1.2 as it runs on a CPU (`dynamics.steps2D_interp` /
`map_coordinates`, `masks_to_flows_cpu`, `metrics.flow_error`, `utils.fill_holes_and_remove_small_masks`),
where they differ from the cellpose 4 rules of `masks_cp4` / `flows_numba` (the masks equal
cellpose 3.1.1.2's bit for bit on its golden flows, tests/cpsam/test_dynamics_cp3.py):

* Euler integration in *pixel* coordinates (no [-1, 1] normalisation, no grid_sample): the field
  is dP * fg / 5 (float32), sampled bilinearly with the four corner indices clamped to the image,
  in the mixed precision that numba's typing gives cellpose's expression (see `_sample`); each
  step adds the sample to the float32 position and clamps it to [0, L - 1] per axis; final
  positions are truncated to int. Seeding is the cellpose 4 one.
* The flow-error QC re-diffuses every mask on its own padded bounding box (h + 2, w + 2) for
  2 * (h + w + 4) iterations of that mask (not a global count), from the mask pixel nearest to
  its mean pixel (first in row-major order on ties; not the rounded mean), each iteration
  multiplying the 3x3 sum by 1/9 (not dividing by 9). Errors are per-channel means summed
  (dy first), each mean a row-major sequential sum divided by the pixel count.
* Masks dropped by the QC are *not* renumbered before the size filter, whose small-mask removal
  removes labels by rank (the k-th present label's count decides the fate of label k), so a
  gap left by the QC shifts the filter onto a neighbouring label (see
  `cpsam.dynamics.fill_holes_and_remove_small_masks`).

Like the cellpose 4 kernels, trajectories stop early at exact fixed points/cycles of the float32
position (exact), or, with settle > 0, once their truncated final pixel is settled.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cpsam.dynamics.flows_numba import (  # shared with the cp4 kernels
    _DEALS,
    _bboxes,
    _by_size,
    diffuse_crop,
    unit_vector,
)
from cpsam.dynamics.masks_cp4 import (
    _HISTORY,
    _integrate_lanes,
    blend_cp3,
    cycle_position,
    dealt_chunks,
    settled,
)


@njit(cache=True, nogil=True, inline="always")
def _sample(field, y, x, ly, lx):
    """Bilinear sample (vy, vx) float32 of the (2, H, W) float32 field at pixel position (y, x).

    Corner indices are clamped to the image; the sum and its precision are `masks_cp4.blend_cp3`.
    """
    yi = np.int32(y)
    xi = np.int32(x)
    fy = y - np.float32(yi)
    fx = x - np.float32(xi)
    y0 = min(ly - 1, max(0, np.int64(yi)))
    x0 = min(lx - 1, max(0, np.int64(xi)))
    y1 = min(ly - 1, y0 + 1)
    x1 = min(lx - 1, x0 + 1)
    vy = blend_cp3(field[0, y0, x0], field[0, y0, x1], field[0, y1, x0], field[0, y1, x1], fy, fx)
    vx = blend_cp3(field[1, y0, x0], field[1, y0, x1], field[1, y1, x0], field[1, y1, x1], fy, fx)
    return vy, vx


@njit(cache=True, nogil=True)
def _integrate_range(field, ys, xs, niter, out, start, stop, settle):
    """Integrate trajectories start..stop; write truncated final (y, x) pixel positions to out.

    Exact early stops: a fixed point, or a position that repeats within `_HISTORY` steps (the
    remaining steps then follow the cycle). settle > 0 also stops a geometrically converging
    trajectory (step ratio < 0.97 over 3 steps) once `settle` x its remaining drift is below its
    distance to the nearest pixel edge (its truncated final pixel is then settled).
    """
    ly = field.shape[1]
    lx = field.shape[2]
    ymax = np.float32(ly - 1)
    xmax = np.float32(lx - 1)
    zero = np.float32(0.0)
    hy = np.empty(_HISTORY, np.float32)
    hx = np.empty(_HISTORY, np.float32)
    for n in range(start, stop):
        py = np.float32(ys[n])
        px = np.float32(xs[n])
        t = 0
        d1 = 0.0
        d2 = 0.0
        while t < niter:
            hy[t % _HISTORY] = py
            hx[t % _HISTORY] = px
            vy, vx = _sample(field, py, px, ly, lx)
            qy = min(ymax, max(zero, py + vy))
            qx = min(xmax, max(zero, px + vx))
            t += 1
            if qy == py and qx == px:  # fixed point
                break
            if settle > 0.0:
                d = max(abs(np.float64(qy) - py), abs(np.float64(qx) - px))
                if settled(d, d1, d2, settle, qy, qx):
                    py = qy
                    px = qx
                    break
                d2 = d1
                d1 = d
            py = qy
            px = qx
            if t % _HISTORY == 0 or t == niter:
                found, py, px = cycle_position(hy, hx, t, niter, py, px)
                if found:
                    break
        out[0, n] = np.int32(py)
        out[1, n] = np.int32(px)


@njit(cache=True, parallel=True)
def _integrate_parallel(field, ys, xs, niter, deal, settle):
    """settle > 0: `_integrate_range` on the (2, H, W) field; else exact lanes on the `lane_field`."""
    n = ys.shape[0]
    out = np.empty((2, n), np.int32)
    nchunks = deal.shape[0]
    step = (n + nchunks - 1) // nchunks
    one = np.float32(1.0)
    for i in prange(nchunks):
        c = deal[i]
        if settle > 0.0:
            _integrate_range(field, ys, xs, niter, out, c * step, min(n, (c + 1) * step), settle)
        else:
            _integrate_lanes(field, ys, xs, niter, out, c * step, min(n, (c + 1) * step), one, one, True)
    return out


@njit(cache=True, nogil=True)
def _integrate_serial(field, ys, xs, niter, settle):
    out = np.empty((2, ys.shape[0]), np.int32)
    if settle > 0.0:
        _integrate_range(field, ys, xs, niter, out, 0, ys.shape[0], settle)
    else:
        one = np.float32(1.0)
        _integrate_lanes(field, ys, xs, niter, out, 0, ys.shape[0], one, one, True)
    return out


def lane_field(field: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1, 2) float32 [x, y] pairs of the (2, H, W) field for `masks_cp4._integrate_lanes`.

    The last row and column are repeated: cellpose 3's sampler clamps the far corner indices to
    the image, so at the last row / column its "next" corner is the same pixel.
    """
    pairs = np.stack([field[1], field[0]], axis=-1)
    return np.ascontiguousarray(np.pad(pairs, ((0, 1), (0, 1), (0, 0)), mode="edge"))


def integrate(dP: np.ndarray, fg: np.ndarray, niter: int, settle: float = 0.0, parallel: bool = True) -> np.ndarray:
    """(2, N) int32 truncated final [y, x] pixel positions of the N foreground pixels (row-major).

    dP: (2, H, W) network flows at 5x scale; fg: (H, W) bool; niter Euler steps in pixel units.
    settle = 0 (exact) runs the lanes of `masks_cp4._integrate_lanes`, > 0 `_integrate_range`.
    """
    field = np.ascontiguousarray(dP.astype(np.float32, copy=False) * fg / np.float32(5.0), dtype=np.float32)
    if settle <= 0.0:
        field = lane_field(field)
    ys, xs = np.nonzero(fg)
    ys = ys.astype(np.int32)
    xs = xs.astype(np.int32)
    if parallel and len(ys) > 4096:
        return _integrate_parallel(field, ys, xs, int(niter), dealt_chunks(64), float(settle))
    return _integrate_serial(field, ys, xs, int(niter), float(settle))


# ---------------------------------------------------------------------------------- QC flows
@njit(cache=True, nogil=True)
def _object_heat(lab, label, y0, y1, x0, x1):
    """Heat (h + 2, w + 2) float64 of one object diffused on its padded box, and its 1/0 mask."""
    hh = y1 - y0 + 2
    ww = x1 - x0 + 2
    inside = np.zeros((hh, ww), np.float64)
    sy = 0.0
    sx = 0.0
    cnt = 0
    for i in range(1, hh - 1):
        for j in range(1, ww - 1):
            if lab[y0 + i - 1, x0 + j - 1] == label:
                inside[i, j] = 1.0
                sy += i  # integer sums, exact in float64 like numpy's mean
                sx += j
                cnt += 1
    ym = sy / cnt
    xm = sx / cnt
    best = np.inf
    ci = 0
    cj = 0
    for i in range(1, hh - 1):  # first pixel in row-major order nearest to the mean
        for j in range(1, ww - 1):
            if inside[i, j] != 0.0:
                d = (j - xm) ** 2 + (i - ym) ** 2
                if d < best:
                    best = d
                    ci = i
                    cj = j
    # cellpose 3: 2 * (h + w) iterations of the padded box, multiplied by 1/9 rather than divided
    return diffuse_crop(inside, ci, cj, 2 * (hh + ww), True), inside


@njit(cache=True, nogil=True)
def _object_flow(lab, label, y0, y1, x0, x1, mu):
    """Diffuse one object on its padded box and write its raw (dy, dx) heat gradient into mu."""
    a, inside = _object_heat(lab, label, y0, y1, x0, x1)
    for i in range(1, a.shape[0] - 1):
        for j in range(1, a.shape[1] - 1):
            if inside[i, j] != 0.0:
                mu[0, y0 + i - 1, x0 + j - 1] = a[i + 1, j] - a[i - 1, j]
                mu[1, y0 + i - 1, x0 + j - 1] = a[i, j + 1] - a[i, j - 1]


@njit(cache=True, nogil=True)
def _object_error(lab, label, y0, y1, x0, x1, dP):
    """cellpose 3's flow error of one object from its own heat: the unit flows of `_flows_parallel`
    at its pixels, each channel's squared errors summed in row-major order (the order of
    `_mask_errors` over the image) and divided by the pixel count, dy's mean plus dx's."""
    a, inside = _object_heat(lab, label, y0, y1, x0, x1)
    five = np.float32(5.0)
    s0 = 0.0
    s1 = 0.0
    cnt = 0
    for i in range(1, a.shape[0] - 1):
        for j in range(1, a.shape[1] - 1):
            if inside[i, j] != 0.0:
                uy, ux = unit_vector(a[i + 1, j] - a[i - 1, j], a[i, j + 1] - a[i, j - 1])  # `_flows_parallel`'s
                e0 = uy - np.float64(dP[0, y0 + i - 1, x0 + j - 1] / five)
                e1 = ux - np.float64(dP[1, y0 + i - 1, x0 + j - 1] / five)
                s0 += e0 * e0
                s1 += e1 * e1
                cnt += 1
    return (0.0 + s0 / cnt) + s1 / cnt


@njit(cache=True, parallel=True)
def _flow_errors_parallel(lab, n, dP):
    box = _bboxes(lab, n)
    order = _by_size(box)  # dealt round-robin to the threads (see `flows_numba._by_size`)
    err = np.full(n, np.nan)  # an absent label: 0 / 0 in cellpose, which never exceeds a threshold
    for c in prange(_DEALS):
        for t in range(c, n, _DEALS):
            k = order[t]
            if box[k, 1] > 0:
                err[k] = _object_error(lab, k + 1, box[k, 0], box[k, 1], box[k, 2], box[k, 3], dP)
    return err


def flow_errors(lab: np.ndarray, n: int, dP: np.ndarray) -> np.ndarray:
    """(n,) float64 flow errors of int32 labels 1..n as cellpose 3's `metrics.flow_error` on CPU
    (nan for an absent label): each object re-diffused and compared on its own, objects in
    parallel; equal to `mask_errors` of `unit_flows` without the (2, H, W) flows."""
    return _flow_errors_parallel(np.ascontiguousarray(lab, dtype=np.int32), int(n),
                                 np.ascontiguousarray(dP, dtype=np.float32))


@njit(cache=True, parallel=True)
def _flows_parallel(lab, n):
    h, w = lab.shape
    box = _bboxes(lab, n)
    mu = np.zeros((2, h, w), np.float64)
    order = _by_size(box)  # dealt round-robin to the threads (see `flows_numba._by_size`)
    for c in prange(_DEALS):
        for t in range(c, n, _DEALS):
            k = order[t]
            if box[k, 1] > 0:
                _object_flow(lab, k + 1, box[k, 0], box[k, 1], box[k, 2], box[k, 3], mu)
    for i in prange(h):
        for j in range(w):
            mu[0, i, j], mu[1, i, j] = unit_vector(mu[0, i, j], mu[1, i, j])
    return mu


def unit_flows(lab: np.ndarray, n: int) -> np.ndarray:
    """(2, H, W) float64 unit flows of int32 labels 1..n by cellpose 3's per-object CPU diffusion.

    Labels may have gaps (an absent label is skipped); each object is independent of the others.
    """
    return _flows_parallel(np.ascontiguousarray(lab, dtype=np.int32), int(n))


def error_kernel_inputs(masks: np.ndarray, mu: np.ndarray, dP: np.ndarray, n: int) -> tuple:
    """The flow-error kernel's arguments: contiguous int64 masks, float64 re-diffused unit flows
    `mu`, float32 network flows `dP`, and the label count."""
    return (np.ascontiguousarray(masks, dtype=np.int64), np.ascontiguousarray(mu, dtype=np.float64),
            np.ascontiguousarray(dP, dtype=np.float32), int(n))


@njit(cache=True, nogil=True)
def _mask_errors(masks, mu, dP, n):
    """Per-label (1..n) mean squared error, channel by channel, row-major sequential sums."""
    h, w = masks.shape
    five = np.float32(5.0)
    err = np.zeros(n, np.float64)
    cnt = np.zeros(n + 1, np.int64)
    for i in range(h):
        for j in range(w):
            cnt[masks[i, j]] += 1
    for c in range(2):
        s = np.zeros(n + 1, np.float64)
        for i in range(h):
            for j in range(w):
                m = masks[i, j]
                if m > 0:
                    e = mu[c, i, j] - np.float64(dP[c, i, j] / five)
                    s[m] += e * e
        for k in range(n):
            # an absent label has mean 0 / 0 = nan in cellpose, which never exceeds a threshold
            err[k] = err[k] + s[k + 1] / cnt[k + 1] if cnt[k + 1] > 0 else np.nan
    return err


def mask_errors(masks: np.ndarray, mu: np.ndarray, dP: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 flow errors of labels 1..n as cellpose 3's `metrics.flow_error` on CPU."""
    return _mask_errors(*error_kernel_inputs(masks, mu, dP, n))
