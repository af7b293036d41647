"""`cpsam distill export`: a model as ONE TorchScript file that segments an image without this package.

    cpsam distill export --model RUN/model.pt --out student.pt
    # anywhere with torch (no cpsam, no numba, no OpenCV):
    seg = torch.jit.load("student.pt")
    masks, flows = seg(torch.from_numpy(image.astype("float32")), 20.0)   # image as read; diameter in px

Inside the file, in this order (each step is the one `cpsam segment` runs, re-expressed in torch ops):
1. channels: a 2-D (H, W) image is one channel; a 3-D image's channel axis is guessed as cellpose 4 /
   `cpsam.transforms.to_channels_last` do (axis 0 if shape[0] < shape[-1], else the last); the first
   `in_channels` channels feed the network, missing ones are zeros (`select_channels` with channels=None);
2. normalization: each channel's 1st / 99th percentiles (linear interpolation, subsampled above 224**3
   pixels as cellpose) mapped to 0 / 1, flat channels zero;
3. diameter rescaling (bilinear; rescale = diam_mean / diameter, the model's diam_labels for 0) with the
   recorded rules (float32 arithmetic and tiles that shrink to small images for the cellpose 3 rules of a
   CPnet, float64 and padding to a full tile for the cellpose 4 rules), padding, overlapping tiles
   (overlap 0.1), the sigmoid taper blending;
4. the network (BatchNorm folded for FastNet students), traced, on tiles `batch_size` at a time;
5. the flows resized back to (H, W); niter = 200 / rescale as `Segmenter`;
6. flows -> masks, all of `cpsam.dynamics.flows_to_masks`: Euler integration of the foreground pixels
   (cellpose 4: `grid_sample` steps in [-1, 1] coordinates; cellpose 3: pixel steps with its bilinear
   sampler's mixed float32 / float64 precision), histogram seeds and their growth, removal of masks over
   max_size_fraction, the flow-error QC (each mask's flows re-diffused on its bounding box, the rules'
   source pixel, iteration count and 1/9 arithmetic), hole filling (4-connected background, masks processed
   in label order) and the small-mask filter (cellpose 3's rank rule under the cp3 rules).
Outside (the caller): reading the file and making a float32 tensor of it; choosing cellpose-3 `channels`
pairs (pass the channels in the order the network wants them); the diameter (no size model inside: give
one, or 0 for the model's own); test-time augmentation (not supported).
Returns masks (H, W) int32 labels 1..N (0 = background) and flows (3, H, W) float32 [dY, dX, cellprob].
Checked against `cpsam segment` on real images (tests/test_distill_export.py). Only TorchScript is
written: the tiling and the dynamics are loops over data-dependent sizes that ONNX graphs cannot hold,
and the `onnx` package is not part of this project's environment.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsam import io
from cpsam.models import resolve_model
from cpsam.segment import CPU_SUB_BATCH, InferenceRules, rules_for
from cpsam.segment_cli import positive_int

# TorchScript functions cannot read module globals: the constants below are repeated as locals where used
# (cpsam.transforms' PERCENTILE_SUBSAMPLE_ABOVE = 224**3, PERCENTILE_SUBSAMPLE_STEP = 224, PAD_DIV = 16).
MAX_CROP_ELEMENTS = 1 << 22  # per chunk of bounding-box crops in the QC and hole filling (32 MiB of float64)


# ----------------------------------------------------------------------------- image -> network input


def _channels_first(image: Tensor, in_channels: int) -> Tensor:
    """(H, W) / (H, W, C) / (C, H, W) image -> (in_channels, H, W) float32 (module docstring, step 1)."""
    x = image.to(torch.float32)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() == 3:
        if not x.shape[0] < x.shape[-1]:
            x = x.permute(2, 0, 1)
    else:
        raise ValueError("expected a 2-D (H, W) or 3-D image")
    c = min(int(x.shape[0]), in_channels)
    out = torch.zeros((in_channels, x.shape[1], x.shape[2]), dtype=torch.float32)
    out[:c] = x[:c]
    return out


def _normalize(x: Tensor) -> Tensor:
    """Per channel of (C, H, W): (v - p1) / (p99 - p1), zero for a flat channel or a range <= 1e-3."""
    subsample_above, subsample_step = 224 * 224 * 224, 224
    out = torch.zeros_like(x)
    for c in range(x.shape[0]):
        channel = x[c]
        if float(channel.max() - channel.min()) <= 0.0:
            continue
        sample = channel
        if channel.numel() > subsample_above:
            sy = max(1, channel.shape[0] // subsample_step)
            sx = max(1, channel.shape[1] // subsample_step)
            sample = channel[::sy, ::sx]
        q = torch.quantile(sample.reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float32))
        low, high = q[0], q[1]
        if float(high - low) > 1e-3:
            out[c] = (channel - low) / (high - low)
    return out


def _linear_taps(src: int, dst: int, float32_coordinates: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OpenCV INTER_LINEAR taps along one axis: (i0, i1 int64, w0, w1 float64) for `dst` outputs from `src`.

    Source coordinate (d + 0.5) * src / dst - 0.5 (rounded to float32 first on OpenCV's generic path),
    clamped at both ends to the edge pixel with weight 1.
    """
    d = torch.arange(dst, dtype=torch.float64)
    f = (d + 0.5) * (1.0 / (dst / src)) - 0.5
    if float32_coordinates:
        f = f.to(torch.float32)
    i0 = torch.floor(f)
    frac = (f - i0).to(torch.float64)
    i0 = i0.to(torch.int64)
    low, high = i0 < 0, i0 >= src - 1
    frac = torch.where(low | high, torch.zeros_like(frac), frac)
    i0 = torch.where(low, torch.zeros_like(i0), torch.where(high, torch.full_like(i0, src - 1), i0))
    return i0, (i0 + 1).clamp(max=src - 1), 1.0 - frac, frac


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """(C, H, W) float32 -> (C, height, width) as `cv2.resize(INTER_LINEAR)` on the (H, W, C) array.

    OpenCV takes two paths: 2-channel float images go through its generic separable code (float32
    coordinates and weights, horizontal pass first; reproduced to 1 ulp), 1-, 3- and 4-channel ones through
    Intel IPP (double-precision coordinates; approximated here to 1 ulp with float64 weights, a float32
    intermediate row). torch's own bilinear interpolation differs by up to 1e-5, which moves masks.
    """
    if x.shape[1] == height and x.shape[2] == width:
        return x
    generic = x.shape[0] == 2
    xi0, xi1, xw0, xw1 = _linear_taps(x.shape[2], width, generic)
    yi0, yi1, yw0, yw1 = _linear_taps(x.shape[1], height, generic)
    if generic:
        t = x[:, :, xi0] * xw0.float() + x[:, :, xi1] * xw1.float()
        return t[:, yi0, :] * yw0.float()[:, None] + t[:, yi1, :] * yw1.float()[:, None]
    xd = x.double()
    t = (xd[:, :, xi0] * xw0 + xd[:, :, xi1] * xw1).float().double()
    return (t[:, yi0, :] * yw0[:, None] + t[:, yi1, :] * yw1[:, None]).float()


def _pad(length: int, tile: int, pad_to_tile: bool) -> tuple[int, int]:
    """(before, after) zero padding of one axis, as `cpsam.transforms.get_pad_yx`."""
    div = 16
    if not pad_to_tile or length >= tile:
        total = int(div * math.ceil(length / div) - length)
    else:
        total = max(0, tile - length - div)
    base = div // 2
    return base + total // 2, base + total - total // 2


def _tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile start offsets along one axis, as `cpsam.transforms.tile_starts` (numpy's linspace, truncated)."""
    overlap = min(0.5, max(0.05, overlap))
    n = 1 if length <= tile else int(math.ceil((1.0 + 2 * overlap) * length / tile))
    stop = float(length - min(tile, length))
    if n == 1:
        return [0]
    step = stop / (n - 1)
    starts = [int(float(i) * step) for i in range(n - 1)]
    starts.append(int(stop))
    return starts


def _taper(length: int) -> Tensor:
    """The 1-D sigmoid taper (float64) of `cpsam.transforms.taper_1d`."""
    size = max(224, length)
    t = torch.arange(size, dtype=torch.float64)
    dist = torch.abs(t - t.mean())
    full = 1.0 / (1.0 + torch.exp((dist - (size / 2 - 20)) / 7.5))
    start = size // 2 - length // 2
    return full[start : start + length]


def _blend_weight(length: int, starts: list[int], tile_len: int) -> Tensor:
    """Sum of the tiles' 1-D tapers along one axis (float64, `length`)."""
    total = torch.zeros(length, dtype=torch.float64)
    taper = _taper(tile_len)
    for s in starts:
        total[s : s + tile_len] = total[s : s + tile_len] + taper
    return total


# ----------------------------------------------------------------------------- flows -> masks


def _euler_cp4(dP: Tensor, fg: Tensor, niter: int) -> Tensor:
    """(2, N) int64 final [y, x] of the foreground pixels, cellpose 4 (`_dynamics_masks.integrate_torch`)."""
    h, w = fg.shape[0], fg.shape[1]
    d = dP.unsqueeze(0) * fg.unsqueeze(0).unsqueeze(0).to(dP.dtype) / 5.0
    im = torch.stack((d[:, 1] * (2.0 / max(w - 1, 1)), d[:, 0] * (2.0 / max(h - 1, 1))), dim=1)
    p = torch.nonzero(fg)
    pt = torch.zeros((1, 1, p.shape[0], 2), dtype=torch.float32)
    pt[0, 0, :, 0] = p[:, 1].float() / max(w - 1, 1)
    pt[0, 0, :, 1] = p[:, 0].float() / max(h - 1, 1)
    pt = pt * 2 - 1
    for _ in range(niter):
        v = F.grid_sample(im, pt, mode="bilinear", padding_mode="zeros", align_corners=False)
        pt = (pt + v[:, :, 0].permute(0, 2, 1)[:, None]).clamp_(-1.0, 1.0)
    pt = (pt + 1) * 0.5
    q = pt[0, 0]
    return torch.stack((q[:, 1] * max(h - 1, 1), q[:, 0] * max(w - 1, 1))).to(torch.int32).to(torch.int64)


def _euler_cp3(dP: Tensor, fg: Tensor, niter: int) -> Tensor:
    """(2, N) int64 final [y, x], cellpose 3 on CPU (`_dynamics_cp3`): pixel steps, clamped-corner bilinear
    sampling with its mixed precision (fractions float32, 1 - f float64, two terms float32), clamp to [0, L-1]."""
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
        gy, gx, fx64 = 1.0 - fy.double(), 1.0 - fx.double(), fx.double()
        vy = fy_field[i00].double() * gy * gx + fy_field[i01].double() * gy * fx64
        vy = vy + (fy_field[i10] * fy).double() * gx
        vy = vy + (fy_field[i11] * fy * fx).double()
        vx = fx_field[i00].double() * gy * gx + fx_field[i01].double() * gy * fx64
        vx = vx + (fx_field[i10] * fy).double() * gx
        vx = vx + (fx_field[i11] * fy * fx).double()
        py = (py + vy.to(torch.float32)).clamp(0.0, ymax)
        px = (px + vx.to(torch.float32)).clamp(0.0, xmax)
    return torch.stack((py.to(torch.int32), px.to(torch.int32))).to(torch.int64)


def _renumber(masks: Tensor) -> Tensor:
    """Labels renumbered 1..N in order of first appearance in row-major order (fastremap.renumber), 0 kept."""
    flat = masks.reshape(-1)
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    first = torch.full((uniq.shape[0],), flat.numel(), dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, torch.arange(flat.numel()), reduce="amin")
    nonzero = torch.nonzero(uniq != 0).reshape(-1)
    order = nonzero[torch.argsort(first[nonzero])]
    mapping = torch.zeros(uniq.shape[0], dtype=torch.int64)
    mapping[order] = torch.arange(1, order.shape[0] + 1)
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


def _seed_labels(pos: Tensor, fg: Tensor, max_size_fraction: float) -> Tensor:
    """Masks (H, W) int64 from final positions (`cpsam.dynamics.get_masks`): 5x5-maximum histogram bins with
    > 10 hits seed, grown 5 times by 3x3 dilation in their 11x11 window over bins with > 2 hits, larger seeds
    (by torch's argsort of the counts) overwrite smaller; masks over max_size_fraction removed; renumbered."""
    h, w = fg.shape[0], fg.shape[1]
    y = pos[0].clamp(0, h - 1)
    x = pos[1].clamp(0, w - 1)
    hist = torch.bincount(y * w + x, minlength=h * w).reshape(h, w).to(torch.int32)
    peak = F.max_pool2d(hist[None, None].float(), 5, stride=1, padding=2)[0, 0]
    is_seed = (hist > 10) & (hist.float() == peak)
    seeds = torch.nonzero(is_seed)
    out = torch.zeros((h, w), dtype=torch.int64)
    if seeds.shape[0] == 0:
        return out
    counts = hist[seeds[:, 0], seeds[:, 1]]
    order = torch.argsort(counts)
    seeds = seeds[order]
    offsets = torch.arange(-5, 6)
    padded = F.pad(hist, (5, 5, 5, 5))
    rows = seeds[:, 0][:, None, None] + offsets[None, :, None] + 5
    cols = seeds[:, 1][:, None, None] + offsets[None, None, :] + 5
    window = padded[rows, cols] > 2
    grown = torch.zeros(window.shape, dtype=torch.float32)
    grown[:, 5, 5] = 1.0
    for _ in range(5):
        grown = F.max_pool2d(grown[:, None], 3, stride=1, padding=1)[:, 0] * window.to(torch.float32)
    hit = torch.nonzero(grown > 0)
    flat_idx = (rows[hit[:, 0], hit[:, 1], 0] - 5) * w + (cols[hit[:, 0], 0, hit[:, 2]] - 5)
    lab = torch.zeros(h * w, dtype=torch.int64).scatter_reduce(0, flat_idx, hit[:, 0] + 1, reduce="amax")
    out[fg] = lab[y * w + x]
    uniq, counts_all = torch.unique(out, return_counts=True)
    big = uniq[(counts_all > h * w * max_size_fraction) & (uniq != 0)]
    return _renumber(_remove_labels(out, big))


def _boxes(masks: Tensor, n: int) -> Tensor:
    """(n, 4) int64 [y0, y1, x0, x1) bounding boxes of labels 1..n (absent labels: y1 <= y0)."""
    nz = torch.nonzero(masks > 0)
    lab = masks[nz[:, 0], nz[:, 1]] - 1
    h, w = masks.shape[0], masks.shape[1]
    y0 = torch.full((n,), h, dtype=torch.int64).scatter_reduce(0, lab, nz[:, 0], reduce="amin")
    y1 = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(0, lab, nz[:, 0], reduce="amax") + 1
    x0 = torch.full((n,), w, dtype=torch.int64).scatter_reduce(0, lab, nz[:, 1], reduce="amin")
    x1 = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(0, lab, nz[:, 1], reduce="amax") + 1
    return torch.stack((y0, y1, x0, x1), dim=1)


def _chunks(boxes: Tensor, labels: Tensor, max_elements: int = 1 << 22) -> list[tuple[Tensor, int, int]]:
    """Labels grouped into chunks whose padded crops (label count x (max h + 2) x (max w + 2)) stay under
    max_elements (MAX_CROP_ELEMENTS); objects sorted by crop area so a chunk holds objects of similar size."""
    hh = boxes[labels - 1, 1] - boxes[labels - 1, 0] + 2
    ww = boxes[labels - 1, 3] - boxes[labels - 1, 2] + 2
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
        out.append((labels[order[start:stop]], hm, wm))
        start = stop
    return out


def _crop_index(boxes: Tensor, labels: Tensor, hm: int, wm: int) -> tuple[Tensor, Tensor]:
    """Row and column indices (K, hm, 1), (K, 1, wm) into an image padded by 1 (top/left) and hm, wm
    (bottom/right): crop k covers rows y0 - 1 .. y0 - 2 + hm of the image (its box plus a 1-px ring)."""
    r = boxes[labels - 1, 0][:, None, None] + torch.arange(hm)[None, :, None]
    c = boxes[labels - 1, 2][:, None, None] + torch.arange(wm)[None, None, :]
    return r, c


def _sum3x3(a: Tensor) -> Tensor:
    """3x3 neighbourhood sums (K, h, w) float64 of inner pixels, zero on the crop border, summed in the
    reference's neighbour order: centre, up, down, left, right, up-left, up-right, down-left, down-right."""
    mid, up, dn = a[:, 1:-1], a[:, :-2], a[:, 2:]
    s = mid[:, :, 1:-1] + up[:, :, 1:-1] + dn[:, :, 1:-1] + mid[:, :, :-2] + mid[:, :, 2:]
    s = s + up[:, :, :-2] + up[:, :, 2:] + dn[:, :, :-2] + dn[:, :, 2:]
    return F.pad(s, (1, 1, 1, 1))


def _sources(inside: Tensor, cp3: bool) -> tuple[Tensor, Tensor]:
    """Source pixel (crop frame) of each object: cp4 the rounded (half-even) mean pixel when it is inside,
    else the nearest inside pixel; cp3 the inside pixel nearest to the exact mean. Ties: first row-major."""
    k, hm, wm = inside.shape[0], inside.shape[1], inside.shape[2]
    ii = torch.arange(hm, dtype=torch.float64)[None, :, None].expand(k, hm, wm)
    jj = torch.arange(wm, dtype=torch.float64)[None, None, :].expand(k, hm, wm)
    m = inside.to(torch.float64)
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


def _flow_errors(masks: Tensor, dP: Tensor, n: int, cp3: bool) -> Tensor:
    """(n,) float64 mean squared error between each mask's re-diffused unit flows and dP / 5
    (`cpsam.dynamics.flow_error` under the cp3 / cp4 rules); absent labels NaN (cp3) or 0 (cp4)."""
    boxes = _boxes(masks, n)
    present = torch.nonzero(boxes[:, 1] > boxes[:, 0]).reshape(-1) + 1
    err = torch.full((n,), math.nan if cp3 else 0.0, dtype=torch.float64)
    if present.numel() == 0:
        return err
    ext = (boxes[present - 1, 1] - boxes[present - 1, 0]) + (boxes[present - 1, 3] - boxes[present - 1, 2]) + 2
    n_iter_global = 2 * int(ext.max())
    heat = torch.zeros((masks.shape[0] + 2, masks.shape[1] + 2), dtype=torch.float64)
    for labels, hm, wm in _chunks(boxes, present):
        mp = F.pad(masks, (1, wm, 1, hm))
        r, c = _crop_index(boxes, labels, hm, wm)
        inside = mp[r, c] == labels[:, None, None]
        k = int(labels.shape[0])
        cy, cx = _sources(inside, cp3)
        m = inside.to(torch.float64)
        a = torch.zeros((k, hm, wm), dtype=torch.float64)
        ks = torch.arange(k)
        hh = boxes[labels - 1, 1] - boxes[labels - 1, 0] + 2
        ww = boxes[labels - 1, 3] - boxes[labels - 1, 2] + 2
        iters = 2 * (hh + ww) if cp3 else torch.full((k,), n_iter_global, dtype=torch.int64)
        for t in range(int(iters.max())):
            active = iters > t
            a[ks, cy, cx] = a[ks, cy, cx] + active.to(torch.float64)
            s = _sum3x3(a)
            nxt = ((1.0 / 9.0) * s) * m if cp3 else (s / 9.0) * m
            a = torch.where(active[:, None, None], nxt, a)
        if not cp3:  # cellpose 4 differentiates the heat of the whole image: neighbours' heat counts
            hit = torch.nonzero(inside)
            heat[r[hit[:, 0], hit[:, 1], 0], c[hit[:, 0], 0, hit[:, 2]]] = a[hit[:, 0], hit[:, 1], hit[:, 2]]
            continue
        dy = F.pad(a[:, 2:, :] - a[:, :-2, :], (0, 0, 1, 1))
        dx = F.pad(a[:, :, 2:] - a[:, :, :-2], (1, 1, 0, 0))
        nrm = 1e-60 + torch.sqrt(dy * dy + dx * dx)
        dpp = F.pad(dP, (1, wm, 1, hm))
        ey = dy / nrm - (dpp[0][r, c] / 5.0).double()
        ex = dx / nrm - (dpp[1][r, c] / 5.0).double()
        cnt = m.sum(dim=(1, 2))
        err[labels - 1] = (ey * ey * m).sum(dim=(1, 2)) / cnt + (ex * ex * m).sum(dim=(1, 2)) / cnt
    if not cp3:
        fg = masks > 0
        dy = (heat[2:, 1:-1] - heat[:-2, 1:-1])[fg]
        dx = (heat[1:-1, 2:] - heat[1:-1, :-2])[fg]
        nrm = 1e-60 + torch.sqrt(dy * dy + dx * dx)
        ey = dy / nrm - (dP[0][fg] / 5.0).double()
        ex = dx / nrm - (dP[1][fg] / 5.0).double()
        lab = masks[fg] - 1
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, ey * ey + ex * ex)
        cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, torch.ones_like(ey))
        err = torch.where(cnt > 0, total / cnt.clamp(min=1.0), err)
    return err


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
    border = torch.ones((obj.shape[0], obj.shape[1] - 2, obj.shape[2] - 2), dtype=torch.float32)
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


def _fill_holes(masks: Tensor) -> Tensor:
    """Fill every mask's holes with its label, masks in label order (a mask in another's hole is absorbed)."""
    n = int(masks.max())
    if n == 0:
        return masks
    boxes = _boxes(masks, n)
    present = torch.nonzero(boxes[:, 1] > boxes[:, 0]).reshape(-1) + 1
    with_holes: list[int] = []
    for labels, _hm, _wm in _chunks(boxes, present):
        holes = _holes(masks, labels, boxes)
        has = holes.reshape(holes.shape[0], -1).any(dim=1)
        for label in labels[has]:
            with_holes.append(int(label))
    with_holes.sort()
    # holes only shrink when earlier labels absorb pixels, so the labels without holes never need a fill;
    # those with holes are refilled one after the other on the current masks (fill_voids' sequential result)
    for label in with_holes:
        lab = torch.tensor([label], dtype=torch.int64)
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


def _drop_small(masks: Tensor, min_size: int, cp3: bool) -> Tensor:
    """Remove masks under min_size pixels and renumber (`fill_holes_and_remove_small_masks`' filter; cp3:
    cellpose 3's rank rule, label k + 1 goes when the k-th present label is small)."""
    uniq, counts = torch.unique(masks, sorted=True, return_counts=True)
    if cp3:
        small = torch.nonzero(counts[1:] < min_size).reshape(-1) + 1
    else:
        fgu = uniq != 0
        small = uniq[fgu][counts[fgu] < min_size]
    return _renumber(_remove_labels(masks, small))


def flows_to_masks_torch(dP: Tensor, cellprob: Tensor, niter: int, cellprob_threshold: float = 0.0,
                         flow_threshold: float = 0.4, min_size: int = 15, max_size_fraction: float = 0.4,
                         rules: str = "cp4") -> Tensor:
    """`cpsam.dynamics.flows_to_masks` in torch ops only (TorchScript-compatible, CPU).

    dP (2, H, W) float32 flows at 5x scale, cellprob (H, W) logits -> (H, W) int64 labels 1..N.
    rules: "cp3" (cellpose 3 on CPU) or "cp4" (cellpose 4).
    """
    cp3 = rules == "cp3"
    fg = cellprob > cellprob_threshold
    h, w = fg.shape[0], fg.shape[1]
    if not bool(fg.any()):
        return torch.zeros((h, w), dtype=torch.int64)
    pos = _euler_cp3(dP, fg, niter) if cp3 else _euler_cp4(dP, fg, niter)
    masks = _seed_labels(pos, fg, max_size_fraction)
    n = int(masks.max())
    if n > 0 and flow_threshold > 0:
        err = _flow_errors(masks, dP, n, cp3)
        bad = torch.nonzero(err > flow_threshold).reshape(-1) + 1
        masks = _remove_labels(masks, bad)
        if not cp3:
            masks = _renumber(masks)
    if min_size > 0:
        masks = _drop_small(masks, min_size, cp3)
    masks = _fill_holes(_compact(masks) if min_size <= 0 else masks)
    if min_size > 0:
        masks = _drop_small(masks, min_size, cp3)
    return masks


# ----------------------------------------------------------------------------- the exported module


class ExportedSegmenter(nn.Module):
    """Image -> (masks, flows) in one scriptable module; see the module docstring for what is inside.

    Args:
        net: the network, traced (`torch.jit.trace`), returning (output (B, 3, h, w), ...).
        in_channels, tile_size: the network's input channels and tile side.
        diam_mean, diam_labels: the model's diameters in px.
        rules: the `cpsam.segment.InferenceRules` to reproduce.
        net_stride: tiles are zero-padded to a multiple of this before the network (cropped after).
        batch_size: tiles per network call (run CPU_SUB_BATCH at a time, as `Segmenter` on a CPU).
    """

    def __init__(self, net: nn.Module, in_channels: int, tile_size: int, diam_mean: float, diam_labels: float,
                 rules: InferenceRules, net_stride: int, batch_size: int = 8, tile_overlap: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.in_channels = int(in_channels)
        self.tile_size = int(tile_size)
        self.diam_mean = float(diam_mean)
        self.diam_labels = float(diam_labels)
        self.pad_to_tile = bool(rules.pad_to_tile)
        self.float32_rescale = bool(rules.float32_rescale)
        self.mask_rules = str(rules.mask_rules)
        self.net_stride = int(net_stride)
        self.batch_size = int(batch_size)
        self.sub_batch = int(CPU_SUB_BATCH)
        self.tile_overlap = float(tile_overlap)

    def rescale_for(self, diameter: float) -> float:
        """diam_mean / diameter (diam_labels for diameter <= 0), in float32 under the cellpose 3 rules."""
        d = diameter if diameter > 0 else self.diam_labels
        if self.float32_rescale:
            return float(torch.tensor(self.diam_mean, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32))
        return self.diam_mean / d

    def default_niter(self, rescale: float) -> int:
        """200 / rescale, truncated (float32 arithmetic under the cellpose 3 rules)."""
        if self.float32_rescale:
            one = torch.tensor(1.0, dtype=torch.float32)
            value = one / torch.tensor(rescale, dtype=torch.float32) * torch.tensor(200.0, dtype=torch.float32)
            return int(value)
        return int(200.0 / rescale)

    def _network(self, tiles: Tensor) -> Tensor:
        """(B, C, th, tw) -> (B, 3, th, tw): tiles padded to the network's stride, run CPU_SUB_BATCH at a time."""
        th, tw = tiles.shape[2], tiles.shape[3]
        ph, pw = (-th) % self.net_stride, (-tw) % self.net_stride
        if ph > 0 or pw > 0:
            tiles = F.pad(tiles, (0, pw, 0, ph))
        outs: list[Tensor] = []
        for part in tiles.split(self.sub_batch):
            outs.append(self.net(part)[0][:, :3].float())
        return torch.cat(outs)[:, :, :th, :tw]

    @torch.jit.export
    def flows(self, image: Tensor, diameter: float = 0.0) -> tuple[Tensor, float]:
        """(flows (3, H, W) float32 [dY, dX, cellprob logit] at the image's size, rescale factor)."""
        x = _normalize(_channels_first(image, self.in_channels))
        height, width = x.shape[1], x.shape[2]
        rescale = self.rescale_for(diameter)
        sh, sw = height, width
        if rescale != 1.0:
            sh, sw = int(height * rescale), int(width * rescale)
            if sh < 1 or sw < 1:
                raise ValueError("the diameter is too large for this image (no pixels left)")
            if sh * sw > 1073741824:  # cpsam.transforms.MAX_SCALED_PIXELS
                raise ValueError("the diameter is too small for this image (over 2**30 pixels after rescaling)")
            x = _resize(x, sh, sw)
        tile = self.tile_size
        top, bottom = _pad(sh, tile, self.pad_to_tile)
        left, right = _pad(sw, tile, self.pad_to_tile)
        x = F.pad(x, (left, right, top, bottom))
        ly, lx = x.shape[1], x.shape[2]
        ys, xs = _tile_starts(ly, tile, self.tile_overlap), _tile_starts(lx, tile, self.tile_overlap)
        th, tw = min(tile, ly), min(tile, lx)
        taper = (_taper(th)[:, None] * _taper(tw)[None, :]).to(torch.float32)
        accum = torch.zeros((3, ly, lx), dtype=torch.float32)
        corners: list[tuple[int, int]] = []
        for y0 in ys:
            for x0 in xs:
                corners.append((y0, x0))
        with torch.no_grad():
            for start in range(0, len(corners), self.batch_size):
                batch = corners[start : start + self.batch_size]
                tiles = torch.stack([x[:, y0 : y0 + th, x0 : x0 + tw] for y0, x0 in batch])
                y = self._network(tiles) * taper
                for k in range(len(batch)):
                    y0, x0 = batch[k]
                    accum[:, y0 : y0 + th, x0 : x0 + tw] = accum[:, y0 : y0 + th, x0 : x0 + tw] + y[k]
        wy = _blend_weight(ly, ys, th)[top : top + sh]
        wx = _blend_weight(lx, xs, tw)[left : left + sw]
        flows = accum[:, top : top + sh, left : left + sw]
        flows = (flows.double() / wy[None, :, None]).float()
        flows = (flows.double() / wx[None, None, :]).float()
        if sh != height or sw != width:
            # OpenCV resizes the flows one 2-D channel at a time (Segmenter._finish)
            flows = torch.cat([_resize(flows[c : c + 1].contiguous(), height, width) for c in range(3)])
        return flows, rescale

    def forward(self, image: Tensor, diameter: float = 0.0, niter: int = 0, cellprob_threshold: float = 0.0,
                flow_threshold: float = 0.4, min_size: int = 15,
                max_size_fraction: float = 0.4) -> tuple[Tensor, Tensor]:
        """Segment one image: (H, W) or 3-D float tensor as read; diameter in px (0: the model's own).

        Returns masks (H, W) int32 (0 = background, 1..N) and flows (3, H, W) float32.
        """
        flows, rescale = self.flows(image, diameter)
        steps = niter if niter > 0 else self.default_niter(rescale)
        with torch.no_grad():
            masks = flows_to_masks_torch(flows[:2].contiguous(), flows[2].contiguous(), steps,
                                         cellprob_threshold, flow_threshold, min_size, max_size_fraction,
                                         self.mask_rules)
        return masks.to(torch.int32), flows


def named_rules(name: str, tile_size: int) -> InferenceRules:
    """The complete cellpose 3 ("cp3": tiles shrink to small images, float32 rescale, cp3 masks) or cellpose 4
    ("cp4": small images padded to a tile, float64 rescale, cp4 masks) rule set, with this tile size."""
    if name not in ("cp3", "cp4"):
        raise ValueError(f"rules must be cp3 or cp4, got {name!r}")
    cp3 = name == "cp3"
    return InferenceRules(tile_size=tile_size, pad_to_tile=not cp3, float32_rescale=cp3, mask_rules=name)


def network_stride(model: nn.Module) -> int:
    """The multiple H and W of a network input must be: 2**(levels - 1) for a CPnet, `stride` for FastNet."""
    from cpsam.models.cpnet import CPnet

    if isinstance(model, CPnet):
        return 2 ** (len(model.nbase) - 2)
    return int(getattr(model, "stride", 16))


def export_model(model: nn.Module, out: str | Path, rules: InferenceRules | None = None, batch_size: int = 8) -> Path:
    """Write `model` (a CPnet or FastNet; eval mode, CPU) as one TorchScript file `out` (atomically).

    rules: the inference rules to reproduce (default: `rules_for(model)`, what `cpsam segment` uses).
    Returns the written path. Raises ValueError for a model without the cpsam model interface.
    """
    for attr in ("in_channels", "tile_size", "diam_mean", "diam_labels"):
        if not hasattr(model, attr):
            raise ValueError(f"{type(model).__name__} lacks `{attr}`: not a cpsam segmentation model")
    rules = rules if rules is not None else rules_for(model)
    net = model.float().cpu().eval()
    if hasattr(net, "fuse"):
        net = net.fuse()
    tile = int(model.tile_size)
    stride = network_stride(model)
    example = torch.zeros(CPU_SUB_BATCH, int(model.in_channels), tile, tile)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
    wrapper = ExportedSegmenter(traced, int(model.in_channels), tile, float(model.diam_mean.detach()[0]),
                                float(model.diam_labels.detach()[0]), rules, stride, batch_size)
    scripted = torch.jit.script(wrapper)
    with io.atomic_path(out) as tmp:
        torch.jit.save(scripted, str(tmp))
    return Path(out)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam distill export`."""
    parser.add_argument("--model", required=True, help="model file, run folder or pretrained name (e.g. RUN/model.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the TorchScript file to write (e.g. student.pt)")
    parser.add_argument("--format", choices=("torchscript",), default="torchscript",
                        help="only TorchScript holds the tiling and the dynamics (see the module docstring)")
    parser.add_argument("--rules", choices=("auto", "cp3", "cp4"), default="auto",
                        help="inference rules: auto = what `cpsam segment` uses for this model (cp3 for a CPnet); "
                             "cp3 / cp4 = cellpose 3's / 4's tiling, rescaling and flow -> mask rules (a student "
                             "runs best under its teacher's: cp3 for cyto_0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="tiles per network call inside the file")


def run(args: argparse.Namespace) -> int:
    """`cpsam distill export`; 0 written, 2 bad request (unreadable model, unwritable --out)."""
    try:
        model = resolve_model(args.model, torch.device("cpu"))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"cpsam distill export: cannot load --model {args.model}: {exc}", file=sys.stderr)
        return 2
    rules = rules_for(model) if args.rules == "auto" else named_rules(args.rules, int(model.tile_size))
    try:
        path = export_model(model, args.out, rules, batch_size=args.batch_size)
    except ValueError as exc:
        print(f"cpsam distill export: {args.model}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cpsam distill export: cannot write --out {args.out}: {io.describe_os_error(exc)}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 2**20
    print(f"cpsam distill export: {args.model} -> {path} ({size:.1f} MiB, TorchScript; rules {rules.mask_rules}, "
          f"tile {rules.tile_size}, {'pad to tile' if rules.pad_to_tile else 'tiles shrink to small images'})")
    return 0
