"""Synthetic microscopy: fluorescence-like and phase-contrast-like images with instance masks.

Cells are star-shaped blobs (random ellipse axes, orientation, and a few random Fourier modes on
the outline) packed densely enough to touch; a pixel belongs to the cell whose normalised radial
distance r / R(theta) is smallest (< 1), which gives shared, realistic boundaries between neighbours.
Images are rendered with per-cell brightness, cytoplasm texture, brighter nuclei, optical blur,
uneven background, Poisson shot noise and Gaussian read noise. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from data_prep.canonical import IndexRow, read_index, write_example, write_index
from data_prep.labels import relabel_consecutive


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of synthetic images. Lengths in pixels.

    shape: (H, W) of the image. diameter: mean cell diameter; diameter_cv: its coefficient of variation.
    coverage: fraction of the area cells should cover (0.2 sparse .. 0.8 crowded and touching).
    max_aspect: largest long/short axis ratio. irregularity: amplitude of outline wobble (0 = ellipses).
    modality: "fluorescence" or "phase". nuclear_channel: fluorescence only, add a nucleus channel
    (image becomes (2, H, W) = [cytoplasm, nucleus]). blur: PSF Gaussian sigma. snr_photons: mean
    photon count of a cell (higher = less shot noise). read_noise: Gaussian noise sigma (counts).
    background: mean background level (counts).
    """

    shape: tuple[int, int] = (256, 256)
    diameter: float = 30.0
    diameter_cv: float = 0.2
    coverage: float = 0.55
    max_aspect: float = 1.8
    irregularity: float = 0.12
    modality: str = "fluorescence"
    nuclear_channel: bool = False
    blur: float = 1.5
    snr_photons: float = 300.0
    read_noise: float = 4.0
    background: float = 100.0


def _cell_outline(rng: np.random.Generator, radius: float, cfg: SyntheticConfig):
    """Return (a, b, angle, modes) of one cell: ellipse semi-axes and Fourier wobble (k, amp, phase)."""
    aspect = rng.uniform(1.0, cfg.max_aspect)
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    modes = [(k, rng.normal(0, cfg.irregularity / k), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    return a, b, rng.uniform(0, np.pi), modes


def synthesize_labels(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Random touching cells: (H, W) uint16 labels 1..N, each object one connected component."""
    h, w = cfg.shape
    mean_area = np.pi * (cfg.diameter / 2) ** 2
    n_target = max(1, int(round(cfg.coverage * h * w / mean_area)))
    best = np.full((h, w), np.inf, np.float32)
    labels = np.zeros((h, w), np.int32)
    centres: list[tuple[float, float, float]] = []
    attempts = 0
    while len(centres) < n_target and attempts < 50 * n_target:
        attempts += 1
        d = max(4.0, rng.normal(cfg.diameter, cfg.diameter_cv * cfg.diameter))
        r = d / 2
        cy, cx = rng.uniform(-0.3 * r, h + 0.3 * r), rng.uniform(-0.3 * r, w + 0.3 * r)
        # allow overlap up to ~25% of the radii so neighbours touch and share a boundary
        if any((cy - y) ** 2 + (cx - x) ** 2 < (0.62 * (r + rr)) ** 2 for y, x, rr in centres):
            continue
        centres.append((cy, cx, r))
        a, b, ang, modes = _cell_outline(rng, r, cfg)
        ext = int(np.ceil(max(a, b) * (1 + 3 * cfg.irregularity) + 2))
        y0, y1 = max(0, int(cy) - ext), min(h, int(cy) + ext + 1)
        x0, x1 = max(0, int(cx) - ext), min(w, int(cx) + ext + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        theta = np.arctan2(v, u)
        wobble = 1 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in modes)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.maximum(wobble, 0.3)
        sub_best, sub_lab = best[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        win = (rho < 1) & (rho < sub_best)
        sub_best[win] = rho[win]
        sub_lab[win] = len(centres)
    return _keep_largest_parts(labels)


def _keep_largest_parts(labels: np.ndarray, min_size: int = 12) -> np.ndarray:
    """Keep only the largest connected piece of every id and drop objects under `min_size` px."""
    out = np.zeros_like(labels)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(labels[sl] == i)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < min_size:
            continue
        out[sl][comp == 1 + int(np.argmax(sizes))] = i
    return relabel_consecutive(out)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std spatially correlated noise."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (n - n.mean()) / (n.std() + 1e-6)


def _per_cell(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], values]).astype(np.float32)[labels]


def _render_fluorescence(labels, cfg, rng):
    h, w = labels.shape
    n = int(labels.max())
    fg = labels > 0
    bright = _per_cell(labels, rng.lognormal(0.0, 0.35, n))
    texture = 1 + 0.25 * _smooth_noise(rng, (h, w), 1.5)
    dist = ndimage.distance_transform_edt(fg)  # soft edge: a little dimmer at the membrane
    edge = np.clip(dist / max(2.0, cfg.diameter / 8), 0.6, 1.0)
    cyto = fg * bright * texture * edge
    nuclei = _nuclei(labels, cfg, rng)
    signal = cyto + (0.8 * nuclei if not cfg.nuclear_channel else 0)
    channels = [signal] + (
        [nuclei * _per_cell(labels, rng.lognormal(0.3, 0.3, n))] if cfg.nuclear_channel else []
    )
    illum = 1 + 0.25 * _smooth_noise(rng, (h, w), max(h, w) / 4)  # uneven illumination
    out = []
    for ch in channels:
        ch = ndimage.gaussian_filter(ch.astype(np.float32), cfg.blur)
        expected = cfg.background * illum.clip(0.5) + cfg.snr_photons * ch * illum.clip(0.5)
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
        counts += rng.normal(0, cfg.read_noise, counts.shape)
        out.append(np.clip(counts, 0, 65535).astype(np.uint16))
    return out[0] if len(out) == 1 else np.stack(out)


def _nuclei(labels, cfg, rng) -> np.ndarray:
    """A smaller bright ellipse inside every cell (eroded cell interior, smoothed)."""
    fg = labels > 0
    # distance to the cell's own boundary (also at shared boundaries between touching cells)
    boundary = np.zeros_like(fg)
    boundary[:-1] |= labels[:-1] != labels[1:]
    boundary[1:] |= labels[:-1] != labels[1:]
    boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    boundary[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    dist = ndimage.distance_transform_edt(~boundary) * fg
    peak = ndimage.maximum(dist, labels, index=np.arange(1, labels.max() + 1))
    rel = dist / np.maximum(_per_cell(labels, np.asarray(peak)), 1)
    nuc = np.clip((rel - 0.45) / 0.2, 0, 1) * fg
    return ndimage.gaussian_filter(nuc.astype(np.float32), 1.0) * (
        1 + 0.2 * _smooth_noise(rng, labels.shape, 1.0)
    )


def _render_phase(labels, cfg, rng):
    h, w = labels.shape
    fg = (labels > 0).astype(np.float32)
    # cell bodies are darker than the background and textured; boundaries between touching cells
    # show as thin bright lines; a bright halo surrounds every cell (phase-contrast artefact)
    boundary = np.zeros((h, w), bool)
    boundary[:-1] |= (labels[:-1] != labels[1:]) & (labels[:-1] > 0) & (labels[1:] > 0)
    boundary[:, :-1] |= (labels[:, :-1] != labels[:, 1:]) & (labels[:, :-1] > 0) & (labels[:, 1:] > 0)
    depth = _per_cell(labels, rng.uniform(0.25, 0.5, int(labels.max())))
    body = ndimage.gaussian_filter(fg * depth * (1 + 0.3 * _smooth_noise(rng, (h, w), 1.2)), 1.0)
    halo = ndimage.gaussian_filter(fg, cfg.diameter / 10 + 1.5) - ndimage.gaussian_filter(fg, 1.0)
    halo = np.clip(halo, 0, None) * (1 - fg)
    lines = ndimage.gaussian_filter(boundary.astype(np.float32), 0.8)
    illum = 1 + 0.15 * _smooth_noise(rng, (h, w), max(h, w) / 3)
    bg = 0.55
    intensity = (bg - body + 0.9 * halo + 0.5 * lines) * illum
    intensity = ndimage.gaussian_filter(intensity, cfg.blur * 0.6)
    photons = cfg.snr_photons
    counts = rng.poisson(np.clip(intensity, 0, None) * photons).astype(np.float32) / photons
    counts += rng.normal(0, cfg.read_noise / 255, counts.shape)
    return np.clip(counts * 255, 0, 255).astype(np.uint8)


def synthesize(cfg: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its masks.

    Returns (image, labels): image uint16 (H, W) (fluorescence), (2, H, W) with `nuclear_channel`,
    or uint8 (H, W) (phase); labels uint16 (H, W), 0 = background, 1..N touching cells.
    """
    if cfg.modality not in ("fluorescence", "phase"):
        raise ValueError(f"modality must be 'fluorescence' or 'phase', got {cfg.modality!r}")
    rng = np.random.default_rng(seed)
    labels = synthesize_labels(cfg, rng)
    render = _render_fluorescence if cfg.modality == "fluorescence" else _render_phase
    return render(labels, cfg, rng), labels


def write_synthetic_dataset(
    out: str | os.PathLike[str],
    n: int,
    cfg: SyntheticConfig = SyntheticConfig(),
    *,
    seed: int = 0,
    split: str = "train",
    dataset: str | None = None,
) -> list[IndexRow]:
    """Write `n` synthetic examples (seeds seed..seed+n-1) as a canonical dataset; returns their rows.

    Diameters vary per image by +-30% around cfg.diameter so models see a range of sizes.
    """
    dataset = dataset or f"synthetic_{cfg.modality}"
    rows = {r.name: r for r in read_index(out)}
    new = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        c = replace(cfg, diameter=float(cfg.diameter * rng.uniform(0.85, 1.15)))
        image, labels = synthesize(c, seed=int(rng.integers(2**31)))
        name = f"{dataset}_{split}_{seed}_{k:04d}"
        row = write_example(
            out,
            name,
            image,
            labels,
            dataset=dataset,
            split=split,
            license="CC0 (synthetic)",
            source=f"data_prep.synthetic {asdict(c)}",
            channel_names="cytoplasm,nucleus" if image.ndim == 3 else cfg.modality,
        )
        rows[name] = row
        new.append(row)
    write_index(Path(out), rows.values())
    return new
