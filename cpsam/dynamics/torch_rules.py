"""The flow -> mask rules of cellpose 4 and cellpose 3 in torch ops: the one torch implementation.

Used by `cpsam.dynamics` on a torch device (`flows_to_masks(..., device="cuda")`, `flow_error`,
`masks_to_flows` with a non-CPU device) and compiled into the TorchScript file of
`distill.export`. Every function is TorchScript-compatible and runs on the device of its inputs.
The numba kernels (`masks_cp4`, `masks_cp3`, `flows_numba`) implement the same rules on the CPU;
tests/cpsam/test_dynamics_parity.py holds the two to identical masks on real flows.

Conventions: dP (2, H, W) float32 [dY, dX] network flows at 5x scale, cellprob (H, W) logits,
fg (H, W) bool foreground, positions (2, N) int64 [y, x] of the N foreground pixels in row-major
order, masks (H, W) int64 labels (0 = background). `cp3` selects cellpose 3.1.1.2's CPU rules
(`cellpose.dynamics` / `cellpose.metrics` of that version), otherwise cellpose 4.2.1.1's.
Float64 arithmetic ("wide") where the reference uses it; float32 on MPS, which has no float64
(there the cp3 Euler steps and the QC errors are then not bit-exact).

The rules (see `masks_cp4` / `masks_cp3` for the numba side):
* Euler integration, cp4 (`cellpose.dynamics.steps_interp` with `grid_sample`): steps in [-1, 1]
  coordinates, the field dP * fg / 5 scaled by 2 / (L - 1), bilinear with zero padding
  (align_corners=False), clamped to [-1, 1]; all `niter` steps. cp3 (`steps2D_interp` /
  `map_coordinates` on CPU): pixel coordinates, bilinear with corner indices clamped to the image
  in numba's mixed float32 / float64 precision, position clamped to [0, L - 1]. Final positions
  are truncated to int.
* Seeds (`get_masks_torch`, same in both): histogram bins of final positions that are their 5x5
  maximum and hold > 10 pixels, ordered by torch's CPU `argsort` of their int32 counts (the
  reference's tie order); each grows 5 times by 3x3 dilation in its 11x11 window over bins with
  > 2 pixels, later seeds overwrite earlier ones; pixels take the label of their final bin; masks
  over max_size_fraction * H * W pixels are removed; labels renumbered in first-appearance order.
* Flow-error QC (`dynamics.flow_error` / `metrics.flow_error`): each mask's unit flows are
  re-diffused (see `unit_flows`) and masks whose mean of sum_c (mu_c - dP_c / 5)^2 exceeds
  flow_threshold are removed; cp4 renumbers after it, cp3 does not.
* Hole filling and the small-mask filter (`utils.fill_holes_and_remove_small_masks`): masks under
  min_size pixels removed (cp3: by rank, label k + 1 goes when the k-th present label is small),
  holes (pixels not 4-connected to the box's outside) filled in label order, filter again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "euler_cp4",
    "euler_cp3",
    "seed_labels",
    "unit_flows",
    "flow_errors",
    "fill_holes",
    "drop_small",
    "masks_from_positions",
    "flows_to_masks",
]


def _wide(device: torch.device) -> torch.dtype:
    """float64, or float32 on MPS (no float64 there)."""
    if device.type == "mps":
        return torch.float32
    return torch.float64


# ----------------------------------------------------------------------------- Euler integration


def euler_cp4(dPs: Tensor, fgs: Tensor, niter: int) -> list[Tensor]:
    """cellpose 4 Euler integration, batched over images of one size.

    dPs (B, 2, H, W) float32 flows at 5x scale, fgs (B, H, W) bool. Returns per image a (2, N_b)
    int64 tensor of the truncated final [y, x] of its foreground pixels (row-major order).
    """
    b, h, w = dPs.shape[0], dPs.shape[2], dPs.shape[3]
    sy, sx = max(h - 1, 1), max(w - 1, 1)
    d = dPs * fgs.unsqueeze(1).to(dPs.dtype) / 5.0
    im = torch.stack((d[:, 1] * (2.0 / sx), d[:, 0] * (2.0 / sy)), dim=1)
    idx: list[Tensor] = [torch.nonzero(fgs[i]) for i in range(b)]
    npts = 1
    for p in idx:
        npts = max(npts, int(p.shape[0]))
    pt = torch.zeros((b, 1, npts, 2), dtype=torch.float32, device=dPs.device)
    for i in range(b):
        p = idx[i]
        pt[i, 0, : p.shape[0], 0] = p[:, 1].float() / sx
        pt[i, 0, : p.shape[0], 1] = p[:, 0].float() / sy
    pt = pt * 2 - 1
    for _ in range(niter):
        v = F.grid_sample(im, pt, mode="bilinear", padding_mode="zeros", align_corners=False)
        pt = (pt + v[:, :, 0].permute(0, 2, 1).unsqueeze(1)).clamp_(-1.0, 1.0)
    pt = (pt + 1) * 0.5
    out: list[Tensor] = []
    for i in range(b):
        q = pt[i, 0, : idx[i].shape[0]]
        out.append(torch.stack((q[:, 1] * sy, q[:, 0] * sx)).to(torch.int32).to(torch.int64))
    return out


def euler_cp3(dP: Tensor, fg: Tensor, niter: int) -> Tensor:
    """cellpose 3 (CPU) Euler integration of one image: (2, N) int64 truncated final [y, x].

    Pixel steps; bilinear sampling with clamped corners in the reference's mixed precision
    (fractions float32, 1 - f wide, the v10 * fy and v11 * fy * fx products float32, summed wide and
    rounded to float32); the float32 position is clamped to [0, L - 1] after each step.
    """
    wide = _wide(dP.device)
    ly, lx = fg.shape[0], fg.shape[1]
    field = dP * fg.to(torch.float32) / 5.0
    fy_field, fx_field = field[0].reshape(-1), field[1].reshape(-1)
    p = torch.nonzero(fg)
    py, px = p[:, 0].to(torch.float32), p[:, 1].to(torch.float32)
    ymax, xmax = float(ly - 1), float(lx - 1)
    for _ in range(niter):
        yi, xi = py.to(torch.int32), px.to(torch.int32)
        fy, fx = py - yi.to(torch.float32), px - xi.to(torch.float32)
        y0 = yi.to(torch.int64).clamp(0, ly - 1)
        x0 = xi.to(torch.int64).clamp(0, lx - 1)
        y1 = (y0 + 1).clamp(max=ly - 1)
        x1 = (x0 + 1).clamp(max=lx - 1)
        i00, i01, i10, i11 = y0 * lx + x0, y0 * lx + x1, y1 * lx + x0, y1 * lx + x1
        gy, gx, fxw = 1.0 - fy.to(wide), 1.0 - fx.to(wide), fx.to(wide)
        vy = fy_field[i00].to(wide) * gy * gx + fy_field[i01].to(wide) * gy * fxw
        vy = vy + (fy_field[i10] * fy).to(wide) * gx
        vy = vy + (fy_field[i11] * fy * fx).to(wide)
        vx = fx_field[i00].to(wide) * gy * gx + fx_field[i01].to(wide) * gy * fxw
        vx = vx + (fx_field[i10] * fy).to(wide) * gx
        vx = vx + (fx_field[i11] * fy * fx).to(wide)
        py = (py + vy.to(torch.float32)).clamp(0.0, ymax)
        px = (px + vx.to(torch.float32)).clamp(0.0, xmax)
    return torch.stack((py.to(torch.int32), px.to(torch.int32))).to(torch.int64)


# ----------------------------------------------------------------------------- labels


def _renumber(masks: Tensor) -> Tensor:
    """Labels renumbered 1..N in order of first appearance in row-major order (fastremap.renumber), 0 kept."""
    flat = masks.reshape(-1)
    dev = masks.device
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    first = torch.full((uniq.shape[0],), flat.numel(), dtype=torch.int64, device=dev)
    first = first.scatter_reduce(0, inverse, torch.arange(flat.numel(), device=dev), reduce="amin")
    nonzero = torch.nonzero(uniq != 0).reshape(-1)
    order = nonzero[torch.argsort(first[nonzero])]
    mapping = torch.zeros(uniq.shape[0], dtype=torch.int64, device=dev)
    mapping[order] = torch.arange(1, order.shape[0] + 1, device=dev)
    return mapping[inverse].reshape(masks.shape)


def _compact(masks: Tensor) -> Tensor:
    """Labels renumbered 1..N in order of their values, 0 kept (what the hole-filling loop does to gaps)."""
    uniq, inverse = torch.unique(masks, sorted=True, return_inverse=True)
    mapping = torch.cumsum((uniq != 0).to(torch.int64), dim=0) * (uniq != 0).to(torch.int64)
    return mapping[inverse].reshape(masks.shape)


def _remove_labels(masks: Tensor, labels: Tensor) -> Tensor:
    """`masks` with every pixel whose label is in `labels` set to 0."""
    if labels.numel() == 0:
        return masks
    return torch.where(torch.isin(masks, labels), torch.zeros_like(masks), masks)


def seed_labels(pos: Tensor, fg: Tensor, max_size_fraction: float = 0.4) -> Tensor:
    """Masks (H, W) int64 from final positions pos (2, N) int64 of the foreground pixels fg (H, W)
    bool: the seeding and growth of the module docstring, masks over max_size_fraction * H * W
    removed, renumbered in first-appearance order (`cpsam.dynamics.get_masks`)."""
    h, w = fg.shape[0], fg.shape[1]
    dev = fg.device
    y = pos[0].clamp(0, h - 1)
    x = pos[1].clamp(0, w - 1)
    hist = torch.bincount(y * w + x, minlength=h * w).reshape(h, w).to(torch.int32)
    peak = F.max_pool2d(hist.unsqueeze(0).unsqueeze(0).float(), 5, stride=1, padding=2)[0, 0]
    is_seed = (hist > 10) & (hist.float() == peak)
    seeds = torch.nonzero(is_seed)
    out = torch.zeros((h, w), dtype=torch.int64, device=dev)
    if seeds.shape[0] == 0:
        return out
    counts = hist[seeds[:, 0], seeds[:, 1]]
    # torch's unstable CPU sort, as the reference: it fixes the order of seeds with equal counts
    order = torch.argsort(counts.cpu()).to(dev)
    seeds = seeds[order]
    offsets = torch.arange(-5, 6, device=dev)
    padded = F.pad(hist, (5, 5, 5, 5))
    rows = seeds[:, 0][:, None, None] + offsets[None, :, None] + 5
    cols = seeds[:, 1][:, None, None] + offsets[None, None, :] + 5
    window = padded[rows, cols] > 2
    grown = torch.zeros(window.shape, dtype=torch.float32, device=dev)
    grown[:, 5, 5] = 1.0
    for _ in range(5):
        grown = F.max_pool2d(grown.unsqueeze(1), 3, stride=1, padding=1)[:, 0] * window.to(torch.float32)
    hit = torch.nonzero(grown > 0)
    flat_idx = (rows[hit[:, 0], hit[:, 1], 0] - 5) * w + (cols[hit[:, 0], 0, hit[:, 2]] - 5)
    lab = torch.zeros(h * w, dtype=torch.int64, device=dev)
    lab = lab.scatter_reduce(0, flat_idx, hit[:, 0] + 1, reduce="amax")
    out[fg] = lab[y * w + x]
    uniq, counts_all = torch.unique(out, return_counts=True)
    big = uniq[(counts_all > h * w * max_size_fraction) & (uniq != 0)]
    return _renumber(_remove_labels(out, big))


# ----------------------------------------------------------------------------- per-object crops


def _boxes(masks: Tensor, n: int) -> Tensor:
    """(n, 4) int64 [y0, y1, x0, x1) bounding boxes of labels 1..n (absent labels: y1 <= y0)."""
    dev = masks.device
    nz = torch.nonzero(masks > 0)
    lab = masks[nz[:, 0], nz[:, 1]] - 1
    h, w = masks.shape[0], masks.shape[1]
    y0 = torch.full((n,), h, dtype=torch.int64, device=dev).scatter_reduce(0, lab, nz[:, 0], reduce="amin")
    y1 = torch.full((n,), -1, dtype=torch.int64, device=dev).scatter_reduce(0, lab, nz[:, 0], reduce="amax") + 1
    x0 = torch.full((n,), w, dtype=torch.int64, device=dev).scatter_reduce(0, lab, nz[:, 1], reduce="amin")
    x1 = torch.full((n,), -1, dtype=torch.int64, device=dev).scatter_reduce(0, lab, nz[:, 1], reduce="amax") + 1
    return torch.stack((y0, y1, x0, x1), dim=1)


def _chunks(boxes: Tensor, labels: Tensor, max_elements: int = 1 << 22) -> list[tuple[Tensor, int, int]]:
    """Labels grouped into chunks whose padded crops (label count x (max h + 2) x (max w + 2)) stay
    under max_elements (32 MiB of float64); objects sorted by crop area so a chunk holds objects of
    similar size. Returns (labels, hm, wm) per chunk."""
    hh = (boxes[labels - 1, 1] - boxes[labels - 1, 0] + 2).cpu()
    ww = (boxes[labels - 1, 3] - boxes[labels - 1, 2] + 2).cpu()
    order = torch.argsort(hh * ww, stable=True)
    out: list[tuple[Tensor, int, int]] = []
    start = 0
    n = int(labels.shape[0])
    while start < n:
        stop = start + 1
        hm, wm = int(hh[order[start]]), int(ww[order[start]])
        while stop < n:
            h2, w2 = max(hm, int(hh[order[stop]])), max(wm, int(ww[order[stop]]))
            if (stop + 1 - start) * h2 * w2 > max_elements:
                break
            hm, wm = h2, w2
            stop += 1
        out.append((labels[order[start:stop].to(labels.device)], hm, wm))
        start = stop
    return out


def _crop_index(boxes: Tensor, labels: Tensor, hm: int, wm: int) -> tuple[Tensor, Tensor]:
    """Row and column indices (K, hm, 1), (K, 1, wm) into an image padded by 1 (top/left) and hm, wm
    (bottom/right): crop k covers rows y0 - 1 .. y0 - 2 + hm of the image (its box plus a 1-px ring)."""
    dev = boxes.device
    r = boxes[labels - 1, 0][:, None, None] + torch.arange(hm, device=dev)[None, :, None]
    c = boxes[labels - 1, 2][:, None, None] + torch.arange(wm, device=dev)[None, None, :]
    return r, c


def _diffusion_step(a: Tensor, inner: Tensor, ninth_product: bool) -> Tensor:
    """One step of the 3x3 mean on crops a (K, h, w): each inner pixel becomes the sum of its 3x3
    neighbourhood, in the reference's neighbour order (centre, up, down, left, right, up-left,
    up-right, down-left, down-right), times 1/9 (ninth_product, cellpose 3) or divided by 9
    (cellpose 4), times inner (K, h - 2, w - 2), the object mask; the crop border stays 0."""
    mid, up, dn = a[:, 1:-1], a[:, :-2], a[:, 2:]
    s = mid[:, :, 1:-1] + up[:, :, 1:-1]
    s += dn[:, :, 1:-1]
    s += mid[:, :, :-2]
    s += mid[:, :, 2:]
    s += up[:, :, :-2]
    s += up[:, :, 2:]
    s += dn[:, :, :-2]
    s += dn[:, :, 2:]
    if ninth_product:
        s.mul_(1.0 / 9.0)
    else:
        s.div_(9.0)
    return F.pad(s.mul_(inner), (1, 1, 1, 1))


def _sources(inside: Tensor, cp3: bool) -> tuple[Tensor, Tensor]:
    """Source pixel (crop frame) of each object: cp4 the rounded (half-even) mean pixel when it is inside,
    else the nearest inside pixel; cp3 the inside pixel nearest to the exact mean. Ties: first row-major."""
    k, hm, wm = inside.shape[0], inside.shape[1], inside.shape[2]
    wide = _wide(inside.device)
    ii = torch.arange(hm, dtype=wide, device=inside.device)[None, :, None].expand(k, hm, wm)
    jj = torch.arange(wm, dtype=wide, device=inside.device)[None, None, :].expand(k, hm, wm)
    m = inside.to(wide)
    cnt = m.sum(dim=(1, 2))
    ym = (ii * m).sum(dim=(1, 2)) / cnt
    xm = (jj * m).sum(dim=(1, 2)) / cnt
    if not cp3:  # the reference rounds in the box frame (crop frame - 1)
        ym = torch.round(ym - 1.0) + 1.0
        xm = torch.round(xm - 1.0) + 1.0
    d = (ii - ym[:, None, None]) ** 2 + (jj - xm[:, None, None]) ** 2
    d = torch.where(inside, d, torch.full_like(d, math.inf)).reshape(k, -1)
    best = torch.argmin(d, dim=1)  # first minimum in row-major order
    return best // wm, best % wm


def unit_flows(masks: Tensor, n: int, cp3: bool) -> Tensor:
    """(2, H, W) wide unit flows [dY, dX] of labels 1..n (gaps allowed), 0 on background.

    Each object's heat is diffused on its own padded bounding-box crop from its source pixel (see
    `_sources`): cp4 (`dynamics.masks_to_flows_gpu` of cellpose 4) one global count
    2 * max(h + w + 2) of iterations, sum / 9, and the gradient of the whole image's heat (a
    neighbour's heat counts at a touching border); cp3 (`masks_to_flows_cpu` of cellpose 3) per
    object 2 * (h + w + 4) iterations, (1/9) * sum, the gradient inside the crop. Central
    differences, normalised with 1e-60.
    """
    h, w = masks.shape[0], masks.shape[1]
    dev = masks.device
    wide = _wide(dev)
    mu = torch.zeros((2, h, w), dtype=wide, device=dev)
    boxes = _boxes(masks, n)
    present = torch.nonzero(boxes[:, 1] > boxes[:, 0]).reshape(-1) + 1
    if present.numel() == 0:
        return mu
    ext = (boxes[present - 1, 1] - boxes[present - 1, 0]) + (boxes[present - 1, 3] - boxes[present - 1, 2]) + 2
    n_iter_global = 2 * int(ext.max())
    heat = torch.zeros((h + 2, w + 2), dtype=wide, device=dev)
    for labels, hm, wm in _chunks(boxes, present):
        mp = F.pad(masks, (1, wm, 1, hm))
        r, c = _crop_index(boxes, labels, hm, wm)
        inside = mp[r, c] == labels[:, None, None]
        k = int(labels.shape[0])
        cy, cx = _sources(inside, cp3)
        m = inside.to(wide)
        a = torch.zeros((k, hm, wm), dtype=wide, device=dev)
        ks = torch.arange(k, device=dev)
        hh = boxes[labels - 1, 1] - boxes[labels - 1, 0] + 2
        ww = boxes[labels - 1, 3] - boxes[labels - 1, 2] + 2
        inner = m[:, 1:-1, 1:-1]
        if cp3:  # each object its own count; the others keep their heat
            iters = 2 * (hh + ww)
            for t in range(int(iters.max())):
                active = iters > t
                a[ks, cy, cx] = a[ks, cy, cx] + active.to(wide)
                a = torch.where(active[:, None, None], _diffusion_step(a, inner, True), a)
        else:
            for _ in range(n_iter_global):
                a[ks, cy, cx] = a[ks, cy, cx] + 1.0
                a = _diffusion_step(a, inner, False)
        hit = torch.nonzero(inside)
        rows, cols = r[hit[:, 0], hit[:, 1], 0], c[hit[:, 0], 0, hit[:, 2]]
        if not cp3:  # cellpose 4 differentiates the heat of the whole image
            heat[rows, cols] = a[hit[:, 0], hit[:, 1], hit[:, 2]]
            continue
        dy = F.pad(a[:, 2:, :] - a[:, :-2, :], (0, 0, 1, 1))
        dx = F.pad(a[:, :, 2:] - a[:, :, :-2], (1, 1, 0, 0))
        nrm = 1e-60 + torch.sqrt(dy * dy + dx * dx)
        mu[0, rows - 1, cols - 1] = (dy / nrm)[hit[:, 0], hit[:, 1], hit[:, 2]]
        mu[1, rows - 1, cols - 1] = (dx / nrm)[hit[:, 0], hit[:, 1], hit[:, 2]]
    if not cp3:
        fg = masks > 0
        dy = heat[2:, 1:-1] - heat[:-2, 1:-1]
        dx = heat[1:-1, 2:] - heat[1:-1, :-2]
        nrm = 1e-60 + torch.sqrt(dy * dy + dx * dx)
        mu = torch.stack((dy / nrm, dx / nrm)) * fg.to(wide)
    return mu


def flow_errors(masks: Tensor, dP: Tensor, n: int, cp3: bool) -> Tensor:
    """(n,) wide mean over each mask's pixels of sum_c (mu_c - dP_c / 5)^2, mu = `unit_flows` of
    `masks` under the rules; an absent label gives NaN (cp3: cellpose 3's 0 / 0) or 0 (cp4).
    cp3 sums the per-channel means (dY first), as cellpose 3's `metrics.flow_error`."""
    mu = unit_flows(masks, n, cp3)
    wide = mu.dtype
    fg = masks > 0
    ey = mu[0][fg] - (dP[0][fg] / 5.0).to(wide)
    ex = mu[1][fg] - (dP[1][fg] / 5.0).to(wide)
    lab = masks[fg] - 1
    zero = torch.zeros(n, dtype=wide, device=masks.device)
    cnt = zero.index_add(0, lab, torch.ones_like(ey))
    if cp3:
        err = zero.index_add(0, lab, ey * ey) / cnt + zero.index_add(0, lab, ex * ex) / cnt
        return err  # 0 / 0 = NaN for an absent label
    total = zero.index_add(0, lab, ey * ey + ex * ex)
    return torch.where(cnt > 0, total / cnt.clamp(min=1.0), zero)


# ----------------------------------------------------------------------------- holes and sizes


def _holes(masks: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
    """(K, hm, wm) bool holes (crop frame) of each label: pixels of its box not 4-connected to the box's
    outside through pixels of other labels / background (fill_voids' rule), for one chunk of labels."""
    hh = boxes[labels - 1, 1] - boxes[labels - 1, 0] + 2
    ww = boxes[labels - 1, 3] - boxes[labels - 1, 2] + 2
    hm, wm = int(hh.max()), int(ww.max())
    mp = F.pad(masks, (1, wm, 1, hm))
    r, c = _crop_index(boxes, labels, hm, wm)
    obj = mp[r, c] == labels[:, None, None]
    free = (~obj).to(torch.float32)
    border = torch.ones((obj.shape[0], obj.shape[1] - 2, obj.shape[2] - 2), dtype=torch.float32, device=masks.device)
    reach = (1.0 - F.pad(border, (1, 1, 1, 1))) * free  # the crop's outer ring, where it is free
    changed = True
    # float shifts, no in-place slice updates and no `while True: break` (TorchScript's optimized executor
    # mis-ran those on the second call)
    while changed:
        grown = reach + F.pad(reach[:, :-1, :], (0, 0, 1, 0)) + F.pad(reach[:, 1:, :], (0, 0, 0, 1))
        grown = grown + F.pad(reach[:, :, :-1], (1, 0, 0, 0)) + F.pad(reach[:, :, 1:], (0, 1, 0, 0))
        grown = (grown > 0).to(torch.float32) * free
        changed = bool((grown != reach).any())
        reach = grown
    return (free > 0) & (reach == 0)


def fill_holes(masks: Tensor) -> Tensor:
    """Fill every mask's holes with its label, masks in label order (a mask in another's hole is
    absorbed), as `fill_voids.fill` per mask in `fill_holes_and_remove_small_masks`. Modifies and
    returns `masks` (H, W) int64."""
    n = int(masks.max())
    if n == 0:
        return masks
    boxes = _boxes(masks, n)
    present = torch.nonzero(boxes[:, 1] > boxes[:, 0]).reshape(-1) + 1
    with_holes: list[int] = []
    for labels, _hm, _wm in _chunks(boxes, present):
        holes = _holes(masks, labels, boxes)
        has = holes.reshape(holes.shape[0], -1).any(dim=1)
        for label in labels[has].cpu():
            with_holes.append(int(label))
    with_holes.sort()
    # holes only shrink when earlier labels absorb pixels, so the labels without holes never need a fill;
    # those with holes are refilled one after the other on the current masks (fill_voids' sequential result)
    for label in with_holes:
        lab = torch.tensor([label], dtype=torch.int64, device=masks.device)
        box = _boxes(masks, n)
        if int(box[label - 1, 1]) <= int(box[label - 1, 0]):
            continue
        holes = _holes(masks, lab, box)[0]
        r, c = _crop_index(box, lab, holes.shape[0], holes.shape[1])
        hit = torch.nonzero(holes)
        ys = r[0, hit[:, 0], 0] - 1
        xs = c[0, 0, hit[:, 1]] - 1
        masks[ys, xs] = label
    return masks


def drop_small(masks: Tensor, min_size: int, cp3: bool) -> Tensor:
    """Remove masks under min_size pixels and renumber in first-appearance order (cp3: cellpose 3's
    rank rule, label k + 1 goes when the k-th present label is small)."""
    uniq, counts = torch.unique(masks, sorted=True, return_counts=True)
    if cp3:
        small = torch.nonzero(counts[1:] < min_size).reshape(-1) + 1
    else:
        fgu = uniq != 0
        small = uniq[fgu][counts[fgu] < min_size]
    return _renumber(_remove_labels(masks, small))


# ----------------------------------------------------------------------------- the pipeline


def masks_from_positions(pos: Tensor, dP: Tensor, fg: Tensor, flow_threshold: float = 0.4, min_size: int = 15,
                         max_size_fraction: float = 0.4, rules: str = "cp4") -> Tensor:
    """Everything after the Euler steps: seeds, flow-error QC, size filter, hole filling, size filter.

    pos (2, N) int64 final positions of the foreground pixels fg (H, W) bool, dP (2, H, W) float32.
    flow_threshold <= 0 skips the QC; min_size <= 0 skips the size filter (labels then compacted by
    the hole filling). Returns (H, W) int64 labels 1..N.
    """
    cp3 = rules == "cp3"
    masks = seed_labels(pos, fg, max_size_fraction)
    n = int(masks.max())
    if n > 0 and flow_threshold > 0:
        err = flow_errors(masks, dP, n, cp3)
        bad = torch.nonzero(err > flow_threshold).reshape(-1) + 1
        masks = _remove_labels(masks, bad)
        if not cp3:  # cellpose 3 leaves the gaps to its rank-based size filter
            masks = _renumber(masks)
    if min_size > 0:
        masks = drop_small(masks, min_size, cp3)
    masks = fill_holes(_compact(masks) if min_size <= 0 else masks)
    if min_size > 0:
        masks = drop_small(masks, min_size, cp3)
    return masks


def flows_to_masks(dP: Tensor, cellprob: Tensor, niter: int, cellprob_threshold: float = 0.0,
                   flow_threshold: float = 0.4, min_size: int = 15, max_size_fraction: float = 0.4,
                   rules: str = "cp4") -> Tensor:
    """`cpsam.dynamics.flows_to_masks` of one image in torch ops, on the device of dP.

    dP (2, H, W) float32 flows at 5x scale, cellprob (H, W) logits; pixels with cellprob >
    cellprob_threshold are integrated for `niter` steps. rules: "cp4" (cellpose 4.2.1.1) or "cp3"
    (cellpose 3.1.1.2 on a CPU). Returns (H, W) int64 labels 1..N (0 = background).
    """
    fg = cellprob > cellprob_threshold
    if not bool(fg.any()):
        return torch.zeros((fg.shape[0], fg.shape[1]), dtype=torch.int64, device=dP.device)
    if rules == "cp3":
        pos = euler_cp3(dP, fg, niter)
    else:
        pos = euler_cp4(dP.unsqueeze(0), fg.unsqueeze(0), niter)[0]
    return masks_from_positions(pos, dP, fg, flow_threshold, min_size, max_size_fraction, rules)
