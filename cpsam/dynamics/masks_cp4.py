"""Flows -> labels under the cellpose 4 rules: Euler integration and histogram seeding (numba).

Kernels behind `cpsam.dynamics` rules="cp4" on the CPU (the public API is there); the same rules
in torch ops are `cpsam.dynamics.torch_rules`. Inputs: dP (2, H, W) float32 flows at 5x scale,
fg (H, W) bool; positions (2, N) int32 [y, x] of the N foreground pixels in row-major order.

Rules copied from cellpose 4.2.1.1 `dynamics` (`steps_interp`, `get_masks_torch`;
recipe section 2.5, pitfall 11):
* Euler steps on normalised coordinates p = 2 * pixel / (L - 1) - 1, the field scaled by
  2 / (L - 1), sampled bilinearly as `torch.nn.functional.grid_sample(align_corners=False,
  padding_mode="zeros")` does on CPU, in float32 with the same operation order, clamped to
  [-1, 1] per axis after each step; final positions are truncated to int.
* Every trajectory is a deterministic function of its float32 position, so once a position
  repeats (a fixed point or a short cycle around a sink) the rest of the trajectory is known:
  the kernel stops there and reads the final position off the cycle. This is exact, and most
  pixels reach their cycle long before `niter`.
* Seeds: histogram bins of final positions that equal their 5x5 maximum and hold > 10 pixels,
  sorted by count with torch's default (unstable) `argsort` on the int32 counts, as cellpose does:
  the order of seeds with equal counts decides which one wins where their windows overlap, and
  a stable sort gives other masks there; each grows 5 times by 3x3 dilation inside its 11x11
  window on bins with > 2 pixels; later (larger) seeds overwrite earlier ones; pixels take the
  label of the bin they converged to.
"""

from __future__ import annotations

import numba
import numpy as np
import torch  # torch's own CPU argsort orders seeds with equal counts as cellpose
from numba import njit, prange

_HISTORY = 16  # longest cycle detected (positions remembered per trajectory) by `_integrate_range`
_ROUND = 16  # `_integrate_lanes` tests for cycles (periods up to 2 * _ROUND) every _ROUND steps
_LANES = 32  # trajectories `_integrate_lanes` advances in lockstep


@njit(cache=True, nogil=True, inline="always")
def _grid_cell(gx, gy, half_w, half_h):
    """grid_sample's source pixel of normalised (gx, gy): floor (x, y) and fractions (we, no).

    The float32 operation order is the one of torch's vectorised CPU kernel (align_corners=False).
    """
    one = np.float32(1.0)
    x = (gx + one) * half_w - np.float32(0.5)
    y = (gy + one) * half_h - np.float32(0.5)
    x_w = np.floor(x)
    y_n = np.floor(y)
    return x_w, y_n, x - x_w, y - y_n


@njit(cache=True, nogil=True, inline="always")
def _blend(v_nw, v_ne, v_sw, v_se, we, no):
    """grid_sample's bilinear sum of four corner values with fractions (we, no), in torch's float32 order."""
    one = np.float32(1.0)
    ea = one - we
    so = one - no
    v = v_nw * (so * ea) + v_ne * (so * we)
    v = v + v_sw * (no * ea)
    return v + v_se * (no * we)


@njit(cache=True, nogil=True, inline="always")
def blend_cp3(v00, v01, v10, v11, fy, fx):
    """cellpose 3's bilinear sum (`masks_cp3._sample`) of float32 corners [y0 x0, y0 x1, y1 x0, y1 x1]
    with float32 fractions (fy, fx), rounded to float32.

    The precision is the one numba infers for cellpose 3's `map_coordinates`: `1 - f` is float64, so
    the terms are  v00 (1 - fy) (1 - fx)  and  v01 (1 - fy) fx  in float64,  (v10 fy) (1 - fx)  with a
    float32 first product, and  v11 fy fx  wholly in float32; summed left to right in float64.
    (All-float64 weights differ in the last bit and move trajectories.)
    """
    gy = 1.0 - np.float64(fy)
    gx = 1.0 - np.float64(fx)
    v = np.float64(v00) * gy * gx + np.float64(v01) * gy * np.float64(fx)
    v = v + np.float64(v10 * fy) * gx
    return np.float32(v + np.float64(v11 * fy * fx))


@njit(cache=True, nogil=True, inline="always")
def _sample(field, gx, gy, half_w, half_h):
    """Bilinear sample of the padded field at normalised (gx, gy), like torch CPU grid_sample.

    `field` is (H+2, W+2, 2) float32 [x, y] with a zero border, so that the zero padding of
    grid_sample needs no bounds checks: positions stay in [-1, 1], hence corners in [-1, L].
    """
    x_w, y_n, we, no = _grid_cell(gx, gy, half_w, half_h)
    ix = np.int64(x_w) + 1
    iy = np.int64(y_n) + 1
    vx = _blend(field[iy, ix, 0], field[iy, ix + 1, 0], field[iy + 1, ix, 0], field[iy + 1, ix + 1, 0], we, no)
    vy = _blend(field[iy, ix, 1], field[iy, ix + 1, 1], field[iy + 1, ix, 1], field[iy + 1, ix + 1, 1], we, no)
    return vx, vy


@njit(cache=True, nogil=True, inline="always")
def settled(d, d1, d2, settle, fy, fx):
    """Whether a trajectory's truncated final pixel can no longer change.

    d, d1, d2: its last three step lengths (pixels). True when it converges geometrically (step
    ratio rho < 0.97, steps under 0.25 px) and `settle` times the remaining drift d*rho/(1-rho) is
    below the distance of its position (fy, fx) (pixel units) to the nearest pixel edge.
    """
    if d < 0.25 and d1 > 0.0 and d2 > 0.0:
        rho = max(d / d1, d1 / d2)
        if rho < 0.97:
            drift = settle * d * rho / (1.0 - rho)
            by = fy - np.floor(fy)
            bx = fx - np.floor(fx)
            return drift < min(by, 1.0 - by) and drift < min(bx, 1.0 - bx)
    return False


@njit(cache=True, nogil=True, inline="always")
def cycle_position(hy, hx, t, niter, py, px):
    """Exact early stop on a cycle: (found, y, x at step niter).

    hy, hx: ring buffers (m,) holding the position of step s at slot s % m for steps t - m .. t - 1
    (m = `_HISTORY` in the one-trajectory kernels); (py, px): the position at step t. If it equals
    the one k steps back (2 <= k <= min(t, m)), the trajectory is periodic with period k from step
    t - k, so p_niter = p_{t-k + (niter-t+k) % k}.
    """
    m = hy.shape[0]
    for k in range(2, min(t, m) + 1):
        j = (t - k) % m
        if hy[j] == py and hx[j] == px:
            r = (t - k) + (niter - t + k) % k
            return True, hy[r % m], hx[r % m]
    return False, py, px


@njit(cache=True, nogil=True)
def _integrate_range(field, ys, xs, niter, out, start, stop, scale_x, scale_y, settle):
    """Integrate trajectories start..stop; write truncated final (y, x) pixel positions to out.

    settle > 0 also stops a trajectory that converges geometrically (step-size ratio rho < 0.97
    over the last 3 steps) once `settle` times the remaining geometric drift d*rho/(1-rho) is
    smaller than its distance to the nearest pixel edge, i.e. when its truncated final position
    is settled. settle = 0: exact (only exact fixed points and cycles stop early).
    """
    half_w = np.float32(field.shape[1] - 2) / np.float32(2.0)
    half_h = np.float32(field.shape[0] - 2) / np.float32(2.0)
    one = np.float32(1.0)
    two = np.float32(2.0)
    half = np.float32(0.5)
    hx = np.empty(_HISTORY, np.float32)
    hy = np.empty(_HISTORY, np.float32)
    sx2 = np.float64(scale_x) / 2.0  # normalised -> pixel units
    sy2 = np.float64(scale_y) / 2.0
    for n in range(start, stop):
        px = np.float32(xs[n]) / scale_x * two - one
        py = np.float32(ys[n]) / scale_y * two - one
        t = 0
        d1 = 0.0
        d2 = 0.0
        while t < niter:
            hx[t % _HISTORY] = px
            hy[t % _HISTORY] = py
            vx, vy = _sample(field, px, py, half_w, half_h)
            qx = min(max(px + vx, -one), one)
            qy = min(max(py + vy, -one), one)
            t += 1
            if qx == px and qy == py:  # fixed point: nothing moves any more
                break
            if settle > 0.0:
                d = max(abs(qx - px) * sx2, abs(qy - py) * sy2)
                if settled(d, d1, d2, settle, (qy + one) * half * scale_y, (qx + one) * half * scale_x):
                    px = qx
                    py = qy
                    break
                d2 = d1
                d1 = d
            px = qx
            py = qy
            if t % _HISTORY == 0 or t == niter:
                # p_t against p_{t-k}, k <= min(t, _HISTORY), all still in the ring
                found, py, px = cycle_position(hy, hx, t, niter, py, px)
                if found:
                    break
        fx = (px + one) * half * scale_x
        fy = (py + one) * half * scale_y
        out[0, n] = np.int32(fy)
        out[1, n] = np.int32(fx)


@njit(cache=True, nogil=True, inline="always")
def _history_row(cur, back):
    """Row of hx / hy holding step t - back (1 <= back <= 2 * _ROUND) after a round ending at t.

    Rows cur .. cur + _ROUND - 1 hold steps t - _ROUND .. t - 1 (this round), the other half
    steps t - 2 * _ROUND .. t - _ROUND - 1 (the round before; valid where t allows).
    """
    return cur + _ROUND - back if back <= _ROUND else (_ROUND - cur) + 2 * _ROUND - back


@njit(cache=True, nogil=True, inline="always")
def _first_repeats(hx, hy, cur, px, py, t_lane, period):
    """Per lane, the smallest j in 2 .. min(t, 2 * _ROUND) with p_{t-j} == p_t (0: none) into `period`.

    The exact cycle test of `cycle_position`, for all lanes at once (a loop over history rows
    with the lanes inside, which the compiler vectorises). A fixed point is a cycle of every
    period, so j = 2 finds it too.
    """
    lanes = px.shape[0]
    for k in range(lanes):
        period[k] = 0
    for j in range(2, 2 * _ROUND + 1):
        row = _history_row(cur, j)
        for k in range(lanes):
            hit = (hx[row, k] == px[k]) & (hy[row, k] == py[k]) & (j <= t_lane[k]) & (period[k] == 0)
            period[k] = j if hit else period[k]


@njit(cache=True, nogil=True, inline="always")
def _cycle_end(hx, hy, cur, k, t, niter, j):
    """Position (y, x) at step niter of lane k, periodic with period j from step t - j:
    p_niter = p_{t - j + (niter - t + j) % j}, still in the history."""
    row = _history_row(cur, j - (niter - t + j) % j)
    return hy[row, k], hx[row, k]


@njit(cache=True, nogil=True, inline="always")
def _lane_start(ys, xs, n, scale_x, scale_y, cp3):
    """Start position (x, y) float32 of trajectory n: grid coordinates (cp4) or pixels (cp3)."""
    if cp3:
        return np.float32(xs[n]), np.float32(ys[n])
    one = np.float32(1.0)
    two = np.float32(2.0)
    return np.float32(xs[n]) / scale_x * two - one, np.float32(ys[n]) / scale_y * two - one


@njit(cache=True, nogil=True, inline="always")
def _lane_pixel(fy, fx, scale_x, scale_y, cp3):
    """Truncated final pixel (y, x) of a position (grid coordinates for cp4, pixels for cp3)."""
    if cp3:
        return np.int32(fy), np.int32(fx)
    one = np.float32(1.0)
    half = np.float32(0.5)
    return np.int32((fy + one) * half * scale_y), np.int32((fx + one) * half * scale_x)


@njit(cache=True, nogil=True)
def _integrate_lanes(field, ys, xs, niter, out, start, stop, scale_x, scale_y, cp3):
    """Exact integration of trajectories start..stop, `_LANES` at a time, under the cellpose 4
    rules (cp3 False: the positions of `_integrate_range` with settle = 0) or the cellpose 3 ones
    (cp3 True: those of `masks_cp3._integrate_range` with settle = 0).

    field: [x, y] float32 pairs, (H + 2, W + 2, 2) from `normalised_field` (cp4), or (H + 1, W + 1,
    2) from `masks_cp3.lane_field` (cp3: dP * fg / 5 in pixel units, last row and column repeated,
    so that the clamped far corners of cellpose 3's sampler are the next cell's); scale_x,
    scale_y: W - 1, H - 1 (cp4 only).

    One step of one trajectory is a chain of dependent float32 operations and loads, so one
    trajectory at a time leaves the core waiting. Here `_LANES` independent trajectories (lanes)
    advance in lockstep, and every step is three loops over the lanes that the compiler turns
    into SIMD code where it can: the sampling weights and cell index of every lane (vectorised),
    the four corner loads (a [x, y] float32 pair is one 64-bit load), and the bilinear sum and
    the clamp (vectorised). The operations, their precision and their order are those of the
    one-at-a-time kernels (`_sample` here, `masks_cp3._sample` there; no fused multiply-add), so
    every position is bit for bit the reference's.
    A lane that has fewer than `_ROUND` steps left keeps its position for the rest of the round.
    A lane starts at a round boundary, so its step count t is a multiple of `_ROUND` after each
    round; then the exact cycle test (`_first_repeats`, periods up to 2 * `_ROUND`, all lanes at
    once) runs; a fixed point is a cycle of every period, so the same test finds it. Stopping at a
    different step than the one-at-a-time kernels does not change the final position, which the
    cycle determines. A finished lane takes the next trajectory. Every trajectory is a function of
    its own start only: results do not depend on lanes, chunks or threads.
    """
    fw = field.shape[1]
    half_w = np.float32(fw - 2) / np.float32(2.0)  # cp4: (W + 2 - 2) / 2
    half_h = np.float32(field.shape[0] - 2) / np.float32(2.0)
    xmax = np.float32(fw - 2)  # cp3: W - 1
    ymax = np.float32(field.shape[0] - 2)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    lo = zero if cp3 else -one  # the clamp of each rule set
    hi_x = xmax if cp3 else one
    hi_y = ymax if cp3 else one
    pairs = field.reshape(-1).view(np.uint64)  # pixel (i, j) -> its [x, y] pair at i * fw + j
    lanes = _LANES
    px = np.zeros(lanes, np.float32)
    py = np.zeros(lanes, np.float32)
    wx = np.zeros(lanes, np.float32)  # bilinear weight of the east / south corners
    wy = np.zeros(lanes, np.float32)
    cell = np.zeros(lanes, np.int64)  # flat index of the north-west corner in `pairs`
    corners = np.zeros((4, lanes), np.uint64)  # nw, ne, sw, se pairs of every lane
    cf = corners.view(np.float32)  # (4, 2 * lanes): x at 2k, y at 2k + 1
    t_lane = np.full(lanes, niter, np.int64)  # steps done; niter for an idle lane
    todo = np.zeros(lanes, np.int64)  # steps of this round
    idx = np.full(lanes, -1, np.int64)  # trajectory of each lane, -1 idle
    hx = np.zeros((2 * _ROUND, lanes), np.float32)
    hy = np.zeros((2 * _ROUND, lanes), np.float32)
    cur = _ROUND  # first row of this round's half of hx / hy
    period = np.zeros(lanes, np.int64)  # cycle period found after a round, 0 none
    nxt = start
    active = 0
    for k in range(lanes):
        if nxt < stop:
            idx[k] = nxt
            px[k], py[k] = _lane_start(ys, xs, nxt, scale_x, scale_y, cp3)
            t_lane[k] = 0
            nxt += 1
            active += 1
    while active > 0:
        cur = _ROUND - cur
        for k in range(lanes):
            todo[k] = min(_ROUND, niter - t_lane[k])
        for s in range(_ROUND):
            if cp3:
                for k in range(lanes):  # masks_cp3._sample's cell and fractions (positions >= 0)
                    gx = px[k]
                    gy = py[k]
                    hx[cur + s, k] = gx
                    hy[cur + s, k] = gy
                    xi = np.int32(gx)
                    yi = np.int32(gy)
                    wx[k] = gx - np.float32(xi)
                    wy[k] = gy - np.float32(yi)
                    cell[k] = np.int64(yi) * fw + np.int64(xi)
            else:
                for k in range(lanes):  # _sample's coordinates, weights and corner cell
                    gx = px[k]
                    gy = py[k]
                    hx[cur + s, k] = gx
                    hy[cur + s, k] = gy
                    x_w, y_n, wx[k], wy[k] = _grid_cell(gx, gy, half_w, half_h)
                    cell[k] = (np.int64(y_n) + 1) * fw + np.int64(x_w) + 1
            for k in range(lanes):  # the loads (no SIMD gather on most x86 targets)
                c = cell[k]
                corners[0, k] = pairs[c]
                corners[1, k] = pairs[c + 1]
                corners[2, k] = pairs[c + fw]
                corners[3, k] = pairs[c + fw + 1]
            if cp3:
                for k in range(lanes):  # masks_cp3._sample's mixed-precision sum, then its clamp
                    vy = blend_cp3(cf[0, 2 * k + 1], cf[1, 2 * k + 1], cf[2, 2 * k + 1], cf[3, 2 * k + 1], wy[k], wx[k])
                    vx = blend_cp3(cf[0, 2 * k], cf[1, 2 * k], cf[2, 2 * k], cf[3, 2 * k], wy[k], wx[k])
                    ox = px[k]
                    oy = py[k]
                    qy = min(hi_y, max(lo, oy + vy))
                    qx = min(hi_x, max(lo, ox + vx))
                    go = s < todo[k]
                    px[k] = qx if go else ox
                    py[k] = qy if go else oy
            else:
                for k in range(lanes):  # _sample's bilinear sum, then the clamp
                    vx = _blend(cf[0, 2 * k], cf[1, 2 * k], cf[2, 2 * k], cf[3, 2 * k], wx[k], wy[k])
                    vy = _blend(cf[0, 2 * k + 1], cf[1, 2 * k + 1], cf[2, 2 * k + 1], cf[3, 2 * k + 1], wx[k], wy[k])
                    ox = px[k]
                    oy = py[k]
                    qx = min(max(ox + vx, lo), hi_x)
                    qy = min(max(oy + vy, lo), hi_y)
                    go = s < todo[k]
                    px[k] = qx if go else ox
                    py[k] = qy if go else oy
        for k in range(lanes):
            t_lane[k] += todo[k]
        _first_repeats(hx, hy, cur, px, py, t_lane, period)
        for k in range(lanes):
            if idx[k] < 0:
                continue
            t = t_lane[k]
            # a short (last) round ends at t == niter and needs no test
            found = todo[k] == _ROUND and period[k] > 0
            fy = py[k]
            fx = px[k]
            if found:
                fy, fx = _cycle_end(hx, hy, cur, k, t, niter, period[k])
            if found or t >= niter:
                n = idx[k]
                out[0, n], out[1, n] = _lane_pixel(fy, fx, scale_x, scale_y, cp3)
                if nxt < stop:
                    idx[k] = nxt
                    px[k], py[k] = _lane_start(ys, xs, nxt, scale_x, scale_y, cp3)
                    t_lane[k] = 0
                    nxt += 1
                else:
                    idx[k] = -1
                    t_lane[k] = niter
                    active -= 1


def dealt_chunks(nchunks: int) -> np.ndarray:
    """(nchunks,) int64 order in which a parallel loop takes row-major chunks of the pixels.

    numba hands each thread a contiguous run of a prange loop; dealing the chunks round-robin
    over the threads (thread r gets chunks r, r + T, r + 2T, ...) spreads every thread's share
    over the whole image instead of giving it one band.
    """
    threads = max(1, min(numba.get_num_threads(), nchunks))
    return np.concatenate([np.arange(r, nchunks, threads) for r in range(threads)]).astype(np.int64)


@njit(cache=True, parallel=True)
def _integrate_parallel(field, ys, xs, niter, scale_x, scale_y, deal, settle):
    out = np.empty((2, ys.shape[0]), np.int32)
    n = ys.shape[0]
    nchunks = deal.shape[0]
    step = (n + nchunks - 1) // nchunks
    for i in prange(nchunks):
        c = deal[i]
        if settle > 0.0:
            _integrate_range(field, ys, xs, niter, out, c * step, min(n, (c + 1) * step), scale_x, scale_y, settle)
        else:
            _integrate_lanes(field, ys, xs, niter, out, c * step, min(n, (c + 1) * step), scale_x, scale_y, False)
    return out


@njit(cache=True, nogil=True)
def _integrate_serial(field, ys, xs, niter, scale_x, scale_y, settle):
    out = np.empty((2, ys.shape[0]), np.int32)
    if settle > 0.0:
        _integrate_range(field, ys, xs, niter, out, 0, ys.shape[0], scale_x, scale_y, settle)
    else:
        _integrate_lanes(field, ys, xs, niter, out, 0, ys.shape[0], scale_x, scale_y, False)
    return out


@njit(cache=True, nogil=True)
def _field(dP, fg, sx, sy):
    h, w = fg.shape
    field = np.zeros((h + 2, w + 2, 2), np.float32)
    five = np.float32(5.0)
    for i in range(h):
        for j in range(w):
            f = np.float32(1.0) if fg[i, j] else np.float32(0.0)
            field[i + 1, j + 1, 0] = dP[1, i, j] * f / five * sx
            field[i + 1, j + 1, 1] = dP[0, i, j] * f / five * sy
    return field


def normalised_field(dP: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """(H+2, W+2, 2) float32 [x, y] field, zero border: dP * fg / 5 scaled by 2 / (L - 1).

    The float32 operations and their order are those of the reference (numpy or torch): flows
    times the 0/1 mask, divided by 5, times the factor rounded to float32 (the reference
    multiplies a float32 tensor by a Python float).
    """
    h, w = fg.shape
    return _field(np.ascontiguousarray(dP, dtype=np.float32), np.ascontiguousarray(fg, dtype=np.bool_),
                  np.float32(2.0 / max(w - 1, 1)), np.float32(2.0 / max(h - 1, 1)))


def integrate_numba(
    dP: np.ndarray, fg: np.ndarray, niter: int, parallel: bool = True, settle: float = 0.0
) -> np.ndarray:
    """Final truncated (2, N) int32 [y, x] positions of the N foreground pixels (row-major order).

    settle: 0 = exact; > 0 stops settled geometric convergence early (see `_integrate_range`).
    """
    h, w = fg.shape
    field = normalised_field(dP, fg)
    ys, xs = np.nonzero(fg)
    ys = ys.astype(np.int32)
    xs = xs.astype(np.int32)
    sx = np.float32(max(w - 1, 1))
    sy = np.float32(max(h - 1, 1))
    if parallel and len(ys) > 4096:
        return _integrate_parallel(field, ys, xs, int(niter), sx, sy, dealt_chunks(64), float(settle))
    return _integrate_serial(field, ys, xs, int(niter), sx, sy, float(settle))


@njit(cache=True, nogil=True)
def _find_seeds(pos, hist):
    """Fill the zero (H, W) int32 `hist` with the positions; its seeds: row-major (y, x, count) arrays."""
    h, w = hist.shape
    n = pos.shape[1]
    for k in range(n):
        y = min(max(pos[0, k], 0), h - 1)
        x = min(max(pos[1, k], 0), w - 1)
        hist[y, x] += 1
    # 5x5 local maxima with > 10 hits, row-major order
    seeds_y = []
    seeds_x = []
    counts = []
    for i in range(h):
        for j in range(w):
            c = hist[i, j]
            if c <= 10:
                continue
            ok = True
            for di in range(max(0, i - 2), min(h, i + 3)):
                for dj in range(max(0, j - 2), min(w, j + 3)):
                    if hist[di, dj] > c:
                        ok = False
            if ok:
                seeds_y.append(i)
                seeds_x.append(j)
                counts.append(c)
    ns = len(counts)
    out_y = np.empty(ns, np.int64)
    out_x = np.empty(ns, np.int64)
    out_c = np.empty(ns, np.int32)
    for s in range(ns):
        out_y[s] = seeds_y[s]
        out_x[s] = seeds_x[s]
        out_c[s] = counts[s]
    return out_y, out_x, out_c


@njit(cache=True, nogil=True)
def _grow_seeds(pos, hist, seeds_y, seeds_x, order, lab):
    """Grow the seeds in `order` (later ones overwrite) in the zero (H, W) int32 `lab`; (N,) int64
    seed label of every position."""
    h, w = hist.shape
    n = pos.shape[1]
    ns = order.shape[0]
    win = np.zeros((11, 11), np.bool_)
    grown = np.zeros((11, 11), np.bool_)
    nxt = np.zeros((11, 11), np.bool_)
    for r in range(ns):
        s = order[r]
        sy = seeds_y[s]
        sx = seeds_x[s]
        for a in range(11):
            for b in range(11):
                y = sy + a - 5
                x = sx + b - 5
                win[a, b] = y >= 0 and y < h and x >= 0 and x < w and hist[y, x] > 2
                grown[a, b] = False
                nxt[a, b] = False  # each buffer is False outside the region it was last written in
        grown[5, 5] = True
        for it in range(5):  # dilation it + 1 reaches at most 5 +- (it + 1)
            lo = 4 - it
            hi = 7 + it
            for a in range(lo, hi):
                for b in range(lo, hi):
                    hit = False
                    if win[a, b]:
                        for da in range(max(0, a - 1), min(11, a + 2)):
                            for db in range(max(0, b - 1), min(11, b + 2)):
                                hit = hit or grown[da, db]
                    nxt[a, b] = hit
            grown, nxt = nxt, grown
        for a in range(11):
            for b in range(11):
                if grown[a, b]:
                    lab[sy + a - 5, sx + b - 5] = r + 1
    out = np.empty(n, np.int64)
    for k in range(n):
        y = min(max(pos[0, k], 0), h - 1)
        x = min(max(pos[1, k], 0), w - 1)
        out[k] = lab[y, x]
    return out


def labels_from_positions(pos: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Seed label (N,) int64 of every integrated pixel (0 = no seed) and the number of seeds."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    # whole-image arrays come from numpy's calloc: pages are zeroed as they are first touched,
    # not all of them by a numba memset
    hist = np.zeros(shape, np.int32)
    sy, sx, counts = _find_seeds(pos, hist)
    if len(counts) == 0:
        return np.zeros(pos.shape[1], np.int64), 0
    # torch's own unstable sort, not a stable one: it fixes the order of equal counts as cellpose
    order = torch.argsort(torch.from_numpy(counts)).numpy().astype(np.int64)
    return _grow_seeds(pos, hist, sy, sx, order, np.zeros(shape, np.int32)), len(counts)
