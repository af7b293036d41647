"""Labels -> unit flows by Cellpose's heat diffusion under the cellpose 4 rules (numba kernels).

Kernels behind `cpsam.dynamics.masks_to_flows` rules="cp4" on the CPU (the public API is there;
`masks_cp3` reuses `diffuse_crop` and `_bboxes`; the torch version is
`cpsam.dynamics.torch_rules.unit_flows`). Input: (H, W) int32 labels 1..n; output (2, H, W)
float64 unit flows [dY, dX], 0 on background.

Rule copied from cellpose 4.2.1.1 `dynamics.masks_to_flows_gpu` (recipe section 3.1, pitfall 12):
the source of every object is its rounded mean pixel (round half to even, in the object's
bounding-box frame), or the object pixel nearest to it; `n_iter = 2 * max(bbox_h + bbox_w + 2)`
over all objects; every iteration adds 1 at each source and sets each object pixel to the sum of
its same-label 3x3 neighbourhood divided by 9; gradients are central differences of the heat over
*all* neighbours; vectors are normalised with 1e-60. The heat of one object never reaches another
one, so instead of sweeping the whole image `n_iter` times (what cellpose does) each object is
diffused on its own bounding-box crop, objects in parallel. The arithmetic (float64, neighbour
summation order, division by 9) is the reference one, so the flows agree to the last bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, inline="always")
def unit_vector(dy: float, dx: float) -> tuple[float, float]:
    """(dy, dx) / (1e-60 + |(dy, dx)|) in float64: cellpose's normalisation of the heat gradient."""
    nrm = 1e-60 + np.sqrt(dy * dy + dx * dx)
    return dy / nrm, dx / nrm


@njit(cache=True, nogil=True)
def _bboxes(lab: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) int64 [y0, y1, x0, x1) bounding boxes of labels 1..n in a (H, W) int32 image."""
    box = np.empty((n, 4), np.int64)
    box[:, 0] = lab.shape[0]
    box[:, 1] = -1
    box[:, 2] = lab.shape[1]
    box[:, 3] = -1
    for i in range(lab.shape[0]):
        for j in range(lab.shape[1]):
            v = lab[i, j]
            if v > 0:
                k = v - 1
                if i < box[k, 0]:
                    box[k, 0] = i
                if i > box[k, 1]:
                    box[k, 1] = i
                if j < box[k, 2]:
                    box[k, 2] = j
                if j > box[k, 3]:
                    box[k, 3] = j
    box[:, 1] += 1
    box[:, 3] += 1
    return box


@njit(cache=True, nogil=True)
def _round_half_even(v: float) -> int:
    f = np.floor(v)
    d = v - f
    if d > 0.5:
        return int(f) + 1
    if d < 0.5:
        return int(f)
    fi = int(f)
    return fi + (fi & 1)


@njit(cache=True, nogil=True)
def _source(lab: np.ndarray, label: int, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int]:
    """Source pixel (bbox-local) of one object: rounded mean, else the nearest object pixel."""
    sy = 0
    sx = 0
    cnt = 0
    for i in range(y0, y1):
        for j in range(x0, x1):
            if lab[i, j] == label:
                sy += i - y0
                sx += j - x0
                cnt += 1
    ym = _round_half_even(sy / cnt)
    xm = _round_half_even(sx / cnt)
    if lab[y0 + ym, x0 + xm] == label:
        return ym, xm
    best = -1
    by = 0
    bx = 0
    for i in range(y0, y1):
        for j in range(x0, x1):
            if lab[i, j] == label:
                d = (i - y0 - ym) ** 2 + (j - x0 - xm) ** 2
                if best < 0 or d < best:
                    best = d
                    by = i - y0
                    bx = j - x0
    return by, bx


@njit(cache=True, nogil=True)
def diffuse_crop(inside, ci, cj, n_iter, ninth_product):
    """Heat (hh, ww) float64 after `n_iter` steps of Cellpose's 3x3 mean diffusion on one object.

    inside: (hh, ww) float64 1/0 mask of the object with a zero 1-px border (pixels of other
    objects hold 0 in this private crop); (ci, cj): the source pixel, +1 before every step. Each
    step replaces every inner pixel by the mean of its 3x3 neighbourhood (the reference's neighbour
    order), masked to the object. ninth_product: (1/9) * sum, cellpose 3's CPU kernel; else
    sum / 9, cellpose 4 (they differ in the last bit, which the flow-error QC can see).
    """
    hh, ww = inside.shape
    a = np.zeros((hh, ww), np.float64)
    b = np.zeros((hh, ww), np.float64)
    ninth = 1.0 / 9.0
    for _ in range(n_iter):
        a[ci, cj] += 1.0
        for i in range(1, hh - 1):
            up = a[i - 1]
            mid = a[i]
            dn = a[i + 1]
            out = b[i]
            msk = inside[i]
            for j in range(1, ww - 1):
                # neighbour order of the reference: (0,0) (-1,0) (+1,0) (0,-1) (0,+1) (-1,-1) (-1,+1)
                # (+1,-1) (+1,+1)
                s = mid[j] + up[j] + dn[j] + mid[j - 1] + mid[j + 1] + up[j - 1] + up[j + 1]
                s = s + dn[j - 1] + dn[j + 1]
                if ninth_product:
                    out[j] = (ninth * s) * msk[j]
                else:
                    out[j] = (s / 9.0) * msk[j]
        a, b = b, a
    return a


@njit(cache=True, nogil=True)
def _diffuse_object(lab, label, y0, y1, x0, x1, cy, cx, n_iter, heat):
    """Run `n_iter` heat iterations for one object on its padded bbox crop; write into `heat`.

    `lab` (H, W) int32 labels, `heat` (H+2, W+2) float64 (1-px zero border like cellpose's pad).
    """
    hh = y1 - y0 + 2
    ww = x1 - x0 + 2
    inside = np.zeros((hh, ww), np.float64)
    for i in range(y0, y1):
        for j in range(x0, x1):
            if lab[i, j] == label:
                inside[i - y0 + 1, j - x0 + 1] = 1.0
    a = diffuse_crop(inside, cy + 1, cx + 1, n_iter, False)
    for i in range(1, hh - 1):
        for j in range(1, ww - 1):
            if inside[i, j] != 0.0:
                heat[y0 + i, x0 + j] = a[i, j]


@njit(cache=True, nogil=True)
def _objects(lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bounding boxes (n, 4), bbox-local sources (n, 2) and the reference iteration count."""
    box = _bboxes(lab, n)
    src = np.zeros((n, 2), np.int64)
    ext = 0
    for k in range(n):
        if box[k, 1] <= 0:
            continue
        src[k, 0], src[k, 1] = _source(lab, k + 1, box[k, 0], box[k, 1], box[k, 2], box[k, 3])
        e = (box[k, 1] - box[k, 0]) + (box[k, 3] - box[k, 2]) + 2
        if e > ext:
            ext = e
    return box, src, 2 * ext


@njit(cache=True, nogil=True)
def _unit_gradient(lab: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(2, H, W) float64 unit central-difference gradient of the padded heat at object pixels."""
    h, w = lab.shape
    mu = np.zeros((2, h, w), np.float64)
    for i in range(h):
        for j in range(w):
            if lab[i, j] > 0:
                mu[0, i, j], mu[1, i, j] = unit_vector(heat[i + 2, j + 1] - heat[i, j + 1],
                                                       heat[i + 1, j + 2] - heat[i + 1, j])
    return mu


@njit(cache=True, nogil=True)
def _prepare(lab: np.ndarray, n: int, n_iter: int):
    """Boxes and sources of labels 1..n and the step count (n_iter < 0: the reference's)."""
    box, src, n_ref = _objects(lab, n)
    return box, src, n_ref if n_iter < 0 else n_iter


@njit(cache=True, nogil=True)
def _diffuse_label(lab, k, box, src, n_iter, heat):
    """Diffuse label k + 1 inside its box into `heat` (an absent label has an empty box and is skipped)."""
    if box[k, 1] > 0:
        _diffuse_object(lab, k + 1, box[k, 0], box[k, 1], box[k, 2], box[k, 3], src[k, 0], src[k, 1], n_iter, heat)


@njit(cache=True, nogil=True)
def _flows_serial(lab: np.ndarray, n: int, n_iter: int, heat: np.ndarray) -> np.ndarray:
    box, src, n_iter = _prepare(lab, n, n_iter)
    for k in range(n):
        _diffuse_label(lab, k, box, src, n_iter, heat)
    return _unit_gradient(lab, heat)


_DEALS = 64  # parallel loops over objects deal them round-robin into this many chunks


@njit(cache=True, nogil=True)
def _by_size(box: np.ndarray) -> np.ndarray:
    """Object indices, largest bounding box first.

    The parallel loops take chunk c = objects c, c + _DEALS, c + 2 * _DEALS, ... of this order:
    numba gives each thread a contiguous run of chunks, and dealt this way every run holds a
    similar mix of large and small objects (contiguous runs of the sorted order did not: the
    thread with the largest objects worked alone at the end).
    """
    return np.argsort(-(box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]))


@njit(cache=True, parallel=True)
def _flows_parallel(lab: np.ndarray, n: int, n_iter: int, heat: np.ndarray) -> np.ndarray:
    box, src, n_iter = _prepare(lab, n, n_iter)
    order = _by_size(box)
    for c in prange(_DEALS):
        for t in range(c, n, _DEALS):
            _diffuse_label(lab, order[t], box, src, n_iter, heat)
    return _unit_gradient(lab, heat)


@njit(cache=True, nogil=True)
def _object_error(lab, k, box, heat, dP):
    """Mean squared error of object k + 1 (row-major sum over its pixels; 0 for an absent label)."""
    if box[k, 1] <= 0:
        return 0.0
    five = np.float32(5.0)
    s = 0.0
    c = 0
    for i in range(box[k, 0], box[k, 1]):
        for j in range(box[k, 2], box[k, 3]):
            if lab[i, j] == k + 1:
                # the unit gradient of `_unit_gradient`, then cellpose's squared error
                uy, ux = unit_vector(heat[i + 2, j + 1] - heat[i, j + 1], heat[i + 1, j + 2] - heat[i + 1, j])
                ey = uy - np.float64(dP[0, i, j] / five)
                ex = ux - np.float64(dP[1, i, j] / five)
                s += ey * ey + ex * ex
                c += 1
    return s / c


@njit(cache=True, parallel=True)
def _flow_errors_parallel(lab: np.ndarray, n: int, dP: np.ndarray, heat: np.ndarray) -> np.ndarray:
    box, src, n_iter = _prepare(lab, n, -1)
    order = _by_size(box)
    for c in prange(_DEALS):
        for t in range(c, n, _DEALS):
            _diffuse_label(lab, order[t], box, src, n_iter, heat)
    err = np.zeros(n, np.float64)
    for c in prange(_DEALS):
        for t in range(c, n, _DEALS):
            err[order[t]] = _object_error(lab, order[t], box, heat, dP)
    return err


def _zero_heat(lab: np.ndarray) -> np.ndarray:
    """(H + 2, W + 2) float64 zeros, the heat map with cellpose's 1-px zero border.

    Allocated by numpy (calloc: the OS hands out zeroed pages as the diffusion threads first
    touch them) rather than inside the kernel, where numba would clear all of it on one thread.
    """
    return np.zeros((lab.shape[0] + 2, lab.shape[1] + 2), np.float64)


def flow_errors(lab: np.ndarray, n: int, dP: np.ndarray) -> np.ndarray:
    """(n,) float64 mean over each mask's pixels of sum_c (mu_c - dP_c / 5)^2, mu the unit flows of
    int32 labels 1..n (`flows_numba`), dP (2, H, W) float32 flows at 5x scale; 0 for an absent label.

    The flow-error QC of cellpose 4 (`dynamics.flow_error`) fused with `flows_numba`: the heat of
    all objects is diffused once (objects in parallel), then each object's error is summed from
    the heat where its pixels lie (objects in parallel, each in row-major order, so the result
    does not depend on threads); no (2, H, W) flow array or per-row sums are built.
    """
    lab = np.ascontiguousarray(lab, dtype=np.int32)
    if n == 0:
        return np.zeros(0, np.float64)
    return _flow_errors_parallel(lab, int(n), np.ascontiguousarray(dP, dtype=np.float32), _zero_heat(lab))


def flows_numba(lab: np.ndarray, n: int, n_iter: int | None = None, parallel: bool = True) -> np.ndarray:
    """Unit flows (2, H, W) float64 of int32 labels 1..n (an absent label is skipped; numba, CPU).

    n_iter: diffusion steps; None = the reference's 2 * max(h + w + 2) over the objects."""
    fn = _flows_parallel if parallel else _flows_serial
    lab = np.ascontiguousarray(lab, dtype=np.int32)
    return fn(lab, int(n), -1 if n_iter is None else int(n_iter), _zero_heat(lab))
