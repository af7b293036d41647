"""The public inference API: images -> flows -> masks, with any cpsam model.

    from cpsam.segment import Segmenter
    seg = Segmenter(model, device="cuda", batch_size=32)
    results = seg.segment(images, diameter=30, channels=None, augment=False)
    results[0].masks, results[0].dP, results[0].cellprob

Tiles are batched ACROSS images: the tiles of consecutive images fill the same network batch
(cellpose runs a list one image at a time). Images are prepared lazily from the input iterable, so
`iter_segment` streams any number of images while holding only the images whose tiles are in flight.

Two rule sets are reproduced exactly (cpsam_recipe.md section 2): CP-SAM follows cellpose 4.2.1.1
(256-px tiles, images smaller than a tile padded to one tile); the classic CPnet follows cellpose
3.1.1.2 (224-px tiles, tiles shrink to small images, float32 diameter and niter arithmetic, and
cellpose 3's CPU flow -> mask rules, `cpsam.dynamics` rules="cp3"). Everything else (channels,
normalization, taper blending, flips) is common to both.

Memory for one image of H x W pixels (Hr x Wr at the network's scale, C input channels): the
normalized input (C x Hr x Wr float32, freed once its last tile is cut), the flow accumulator
(3 x Hr x Wr float32, whose crop is returned as dP/cellprob), the resized flows (3 x H x W
float32, only when a diameter rescales the image) and what `cpsam.dynamics` needs to turn them
into masks; the network only ever sees `batch_size` tiles. No whole-image network pass, no tile
stack and no full-size weight image are built: an 8192 x 8192 grayscale image peaks at about
16 bytes per pixel of numpy memory for its flows (measured in tests/cpsam/test_segment_large.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cpsam import transforms
from cpsam.size import SizeModel, median_diameter
from cpsam.window import WindowPlan, plan_window, resize_window

DEFAULT_NITER = 200
# On a CPU a network call runs its tiles this many at a time. Larger CPU batches gain nothing in
# the convolutions and matmuls, and their activations (over 32 MiB, glibc's largest heap-served
# size) come from fresh mmap allocations that page-fault in every layer (figures per batch size:
# docs/results/segmentation.md).
CPU_SUB_BATCH = 2


class ImageError(ValueError):
    """An input array that cannot be segmented (wrong dimensionality, NaN/Inf, no pixels, ...)."""


@dataclass(frozen=True)
class InferenceRules:
    """The parts of the pipeline that differ between the cellpose 4 (CP-SAM) and 3 (CPnet) rules.

    Args:
        tile_size: tile side in pixels (256 CP-SAM, 224 CPnet).
        pad_to_tile: pad images smaller than a tile up to one full tile (cellpose 4; the ViT needs
            fixed-size tiles); otherwise tiles shrink to the image (cellpose 3).
        float32_rescale: compute diam_mean / diameter in float32 (cellpose 3 keeps diam_mean as a
            numpy float32) and the default niter as float32 1 / rescale * 200, truncated; else
            float64 diam_mean / diameter and int(200 / rescale) (cellpose 4). The two niter
            rules differ by one step where 200 / rescale is within float32 rounding of an integer.
        mask_rules: flow -> mask rules of `cpsam.dynamics.flows_to_masks`: "cp3" (what cellpose 3.1.1.2
            computes on a CPU) or "cp4" (cellpose 4.2.1.1); either runs on any masks_device.
    """

    tile_size: int
    pad_to_tile: bool
    float32_rescale: bool
    mask_rules: str = "cp4"


def recorded_inference(model: nn.Module) -> dict[str, Any]:
    """What training recorded in the model's checkpoint for inference (`inference` of model.pt, attached by
    `cpsam.models.loading.load_model` as `model.inference_record`): "mask_rules" ("cp3" / "cp4"), "channels"
    ([SEG, NUC] or None), "flow_threshold", "cellprob_threshold"; {} for a model without a record."""
    return dict(getattr(model, "inference_record", None) or {})


DEFAULT_FLOW_THRESHOLD = 0.4  # cellpose's flow_threshold


def calibrated_flow_threshold(model: nn.Module) -> float | None:
    """The flow threshold calibrated for `model` (`mask_thresholds.flow_threshold` of its inference record, written
    by `cpsam distill`'s calibration, distill.calibrate), or None when it has none. The record's plain
    `flow_threshold` (the mask threshold validation used) is not one. Raises ValueError for a recorded value that
    is not a number >= 0."""
    value = (recorded_inference(model).get("mask_thresholds") or {}).get("flow_threshold")
    if value is None:
        return None
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"the model's recorded mask_thresholds.flow_threshold must be a number >= 0, got {value}")
    return value


def recorded_flow_threshold(model: nn.Module) -> float:
    """The flow threshold `Segmenter` applies when the caller gives none: the model's calibrated one
    (`calibrated_flow_threshold`) or cellpose's 0.4."""
    value = calibrated_flow_threshold(model)
    return DEFAULT_FLOW_THRESHOLD if value is None else value


def rules_for(model: nn.Module) -> InferenceRules:
    """Cellpose-3 rules for a classic CPnet (and its students), cellpose-4 rules for anything else; the flow ->
    mask rules recorded in the model's checkpoint win (a FastNet distilled from cyto_0 keeps cyto_0's "cp3")."""
    from cpsam.models.cpnet import CPnet  # here, not at the top: cpsam.models loads segment_anything (seconds)

    if isinstance(model, CPnet):
        rules = InferenceRules(tile_size=int(model.tile_size), pad_to_tile=False, float32_rescale=True,
                               mask_rules="cp3")
    else:
        rules = InferenceRules(tile_size=int(model.tile_size), pad_to_tile=True, float32_rescale=False,
                               mask_rules="cp4")
    recorded = recorded_inference(model).get("mask_rules")
    if recorded in ("cp3", "cp4") and recorded != rules.mask_rules:
        rules = dataclasses.replace(rules, mask_rules=recorded)
    return rules


@dataclass
class SegmentResult:
    """Segmentation of one image, at the image's own size (H, W).

    masks: (H, W) uint16 (uint32 above 65535 cells) labels, 0 = background, 1..N consecutive
        (an empty (0, 0) array when masks were not requested).
    dP: (2, H, W) float32 flows [dY, dX] at 5x unit length, as the network predicts them.
    cellprob: (H, W) float32 cell-probability logits.
    rescale: factor the image was resized by for the network (diam_mean / diameter).
    niter: Euler steps used by the dynamics.
    diameter: the cell diameter in pixels of the input image that the image was segmented at
        (diam_mean / rescale): the one given, the model's own, or the size model's estimate.
    diameter_source: "given", "model" (the model's diam_labels) or "size model" (estimated, see
        `cpsam.size`).
    style: (S,) float32 style vector of the image (the L2-normalized sum of its tiles' styles, as
        cellpose 3's `run_net`), or None for models without one (CP-SAM).
    diameter_style: the size model's style-only estimate (cellpose 3's `diam_style`), when estimated.
    """

    masks: np.ndarray
    dP: np.ndarray
    cellprob: np.ndarray
    rescale: float
    niter: int
    diameter: float = 0.0
    diameter_source: str = "given"
    style: np.ndarray | None = None
    diameter_style: float | None = None

    @property
    def n_cells(self) -> int:
        """Number of masks (labels are consecutive, so this is masks.max())."""
        return int(self.masks.max()) if self.masks.size else 0


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate one input image; returns it as a numpy array or raises ImageError saying why.

    Accepted: 2-D (H, W) or 3-D (H, W, C) / (C, H, W) arrays of a real numeric dtype, with pixels,
    without NaN or Inf.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ImageError(f"unsupported pixel type {image.dtype} (expected integers or floats)")
    if image.size == 0:
        raise ImageError(f"image has no pixels (shape {image.shape})")
    if image.ndim not in (2, 3):
        raise ImageError(
            f"unsupported dimensionality: shape {image.shape} "
            "(expected 2-D H x W, or 3-D H x W x C / C x H x W)"
        )
    check_finite(image)
    return image


def check_finite(image: np.ndarray) -> None:
    """Raise ImageError for a float image with NaN or Inf pixels (one of them turns the percentile normalization,
    and so every output, into NaN)."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        n_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise ImageError(f"image contains {n_bad} NaN/Inf pixel values")


@dataclass(eq=False)
class _InFlight:
    """One image on its way through the network (normalized input and flow accumulator)."""

    index: int
    shape: tuple[int, int]
    rescale: float
    niter: int
    pads: tuple[int, int, int, int]
    scaled: tuple[int, int]
    ystarts: np.ndarray
    xstarts: np.ndarray
    tile_hw: tuple[int, int]
    image: np.ndarray | None
    error: ImageError | None = None
    accum: np.ndarray | None = None
    remaining: int = 0
    flips: list[tuple[bool, bool]] = field(default_factory=list)
    style_sum: np.ndarray | None = None
    diameter: float = 0.0
    diameter_source: str = "given"
    diameter_style: float | None = None
    # segment_window: the global index of the first tile row / column (the flip pattern), and the plan
    tile_origin: tuple[int, int] = (0, 0)
    window: WindowPlan | None = None


def _failed(index: int, error: ImageError) -> _InFlight:
    """A placeholder that carries an image's error through the tile stream (keeps the order)."""
    empty = np.zeros(0, np.int64)
    return _InFlight(index=index, shape=(0, 0), rescale=1.0, niter=0, pads=(0, 0, 0, 0), scaled=(0, 0),
                     ystarts=empty, xstarts=empty, tile_hw=(0, 0), image=None, error=error)


class Segmenter:
    """Run a cpsam model (CP-SAM, classic CPnet, a distilled student) over images.

    Args:
        model: a network following the cpsam model interface (`diam_mean`, `diam_labels`,
            `tile_size`, `in_channels`; `model(x)[0]` is the (B, 3, h, w) output).
        device: torch device for the network ("cpu", "cuda", "cuda:1", ...; default: the model's).
        batch_size: tiles per network call (tiles of several images share a call). On a CPU the
            call runs its tiles `CPU_SUB_BATCH` at a time (see there).
        bf16: run the network in bfloat16 (weights converted in place, as cellpose does);
            outputs are accumulated in float32 either way.
        tile_overlap: fraction of tile overlap (cellpose default 0.1, clipped to [0.05, 0.5]).
        rules: override the cellpose-3/4 rule set chosen from the model type.
        masks_device: where `cpsam.dynamics` turns flows into masks: None = CPU (numba), or a
            torch device such as "cuda" for `cpsam.dynamics.torch_rules` there, under either mask
            rule set (same masks).
        size_model: a `cpsam.size.SizeModel` used when no diameter is given (default: the model's
            `size_model` attribute, which `pretrained("cyto_0")` and the model loaders set when a
            size file is found beside the weights). Only models with a style vector (CPnet) use it.
        timings: optional collector of wall seconds per stage (benchmarks.bench_students passes
            one); each stage's seconds are added to its key over every call: "read" (`segment_window`'s
            reads), "normalize" (image
            checks, channels, percentile normalization), "resize" (rescaling and padding the
            input, resizing the flows back), "network" (the model calls), "tiles" (cutting,
            batching, taper blending and accumulating tiles, normalizing the blend) and "masks"
            (`cpsam.dynamics.flows_to_masks`). Outputs do not depend on it; the public attribute
            `timings` may be replaced or set to None later. On a GPU the network's kernels run
            asynchronously: their time shows up in "tiles", where the outputs are copied back.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        bf16: bool = False,
        tile_overlap: float = 0.1,
        rules: InferenceRules | None = None,
        masks_device: str | torch.device | None = None,
        size_model: SizeModel | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.timings = timings
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.batch_size = int(batch_size)
        self.tile_overlap = float(tile_overlap)
        self.rules = rules if rules is not None else rules_for(model)
        self.in_channels = int(model.in_channels)
        recorded = recorded_inference(model).get("channels")
        # [SEG, NUC] the model was trained on (a distilled student: its teacher's), used when none are given
        self.default_channels: list[int] | None = [int(c) for c in recorded] if recorded is not None else None
        self.flow_threshold = recorded_flow_threshold(model)  # used when a call gives none
        self.masks_device = masks_device
        self._tapers: dict[tuple[int, int], torch.Tensor] = {}
        self.style_channels = int(getattr(model, "style_channels", 0) or 0)  # 0: no style vector (CP-SAM)
        size_model = size_model if size_model is not None else getattr(model, "size_model", None)
        if size_model is not None and size_model.style_channels != self.style_channels:
            raise ValueError(
                f"the size model expects {size_model.style_channels}-value styles, the model has "
                f"{self.style_channels or 'no'} style vector"
            )
        self.size_model = size_model

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Add the wall seconds of the block to `timings[name]` (nothing without a collector)."""
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ public API
    def segment(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        *,
        diameter: float | Sequence[float | None] | None = None,
        channels: Sequence[int] | None = None,
        channel_axis: int | None = None,
        augment: bool = False,
        compute_masks: bool = True,
        niter: int | None = None,
        flow_threshold: float | None = None,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        max_size_fraction: float = 0.4,
        estimate_diameters: bool = True,
        normalization: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[SegmentResult]:
        """Segment a list of images (or one image); returns one SegmentResult per image, in order.

        Args:
            images: a list of 2-D / 3-D arrays, or a single such array.
            diameter: typical cell diameter in pixels, one for all images or one per image;
                None or 0: estimated by the size model when there is one (see `estimate_diameter`),
                else the model's own (rescale = diam_mean / diam_labels).
            channels: [channel to segment, nuclear channel] in the cellpose 1-3 convention
                (0 = grayscale / none, 1..C); None: the channels recorded in the model's checkpoint
                (`default_channels`), else the first `in_channels` channels.
            channel_axis: channel axis of 3-D images (None: guessed as cellpose 4).
            augment: flip test-time augmentation on half-overlapping tiles.
            compute_masks: run the dynamics (otherwise masks are empty arrays).
            niter: Euler steps; None -> 200 / rescale, truncated (cellpose's resample=True rule,
                in float32 under the cellpose-3 rules, see `InferenceRules`).
            flow_threshold, cellprob_threshold, min_size, max_size_fraction: passed to
                `cpsam.dynamics.flows_to_masks`; flow_threshold None: the model's (`recorded_flow_threshold`).
            estimate_diameters: False ignores the size model (None then means the model's own).
            normalization: per network input channel, the (low, high) intensities that map to 0 / 1 (None
                for a channel without contrast), used instead of each image's own 1st / 99th percentiles
                (`transforms.normalize_with_bounds`). `cpsam.blockwise` passes the whole image's bounds
                so that each block is scaled as the in-memory run scales the whole image.
        Raises ImageError for an unusable image.
        """
        if isinstance(images, np.ndarray):  # one image (a stack is not split: pass a list)
            images = [images]
        return list(
            self.iter_segment(
                images, diameter=diameter, channels=channels, channel_axis=channel_axis, augment=augment,
                compute_masks=compute_masks, niter=niter, flow_threshold=flow_threshold,
                cellprob_threshold=cellprob_threshold, min_size=min_size, max_size_fraction=max_size_fraction,
                estimate_diameters=estimate_diameters, normalization=normalization,
            )
        )

    def iter_segment(
        self,
        images: Iterable[np.ndarray],
        *,
        diameter: float | Sequence[float | None] | None = None,
        channels: Sequence[int] | None = None,
        channel_axis: int | None = None,
        augment: bool = False,
        compute_masks: bool = True,
        niter: int | None = None,
        flow_threshold: float | None = None,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        max_size_fraction: float = 0.4,
        skip_errors: bool = False,
        estimate_diameters: bool = True,
        normalization: Sequence[tuple[float, float] | None] | None = None,
    ) -> Iterator[SegmentResult | ImageError]:
        """Like `segment` but lazy: consumes `images` as tiles are needed, yields results in order.

        With skip_errors=True an unusable image yields its ImageError (in its place in the order)
        instead of stopping the stream.
        """
        diameters = list(diameter) if isinstance(diameter, (Sequence, np.ndarray)) else None
        if channels is None:
            channels = self.default_channels
        mask_kwargs = dict(
            flow_threshold=self.flow_threshold if flow_threshold is None else flow_threshold,
            cellprob_threshold=cellprob_threshold,
            min_size=min_size, max_size_fraction=max_size_fraction,
        )

        estimate = estimate_diameters and self.size_model is not None

        def prepared() -> Iterator[_InFlight]:
            for index, image in enumerate(images):
                diam = diameters[index] if diameters is not None else diameter
                try:
                    source, diam_style = ("given", None) if diam is not None and diam > 0 else ("model", None)
                    if source == "model" and estimate:
                        diam, diam_style = self.estimate_diameter(
                            image, channels=channels, channel_axis=channel_axis, augment=augment
                        )
                        source = "size model"
                    state = self._prepare(index, image, diam, channels, channel_axis, augment, niter, normalization)
                    state.diameter_source, state.diameter_style = source, diam_style
                    yield state
                except ImageError as exc:
                    if not skip_errors:
                        raise
                    yield _failed(index, exc)

        for state in self._run_tiles(prepared(), augment):
            yield state.error if state.error is not None else self._finish(state, compute_masks, mask_kwargs)

    def estimate_diameter(
        self,
        image: np.ndarray,
        *,
        channels: Sequence[int] | None = None,
        channel_axis: int | None = None,
        augment: bool = False,
    ) -> tuple[float, float]:
        """Cell diameter of one image in pixels by the size model, as cellpose 3.1's `SizeModel.eval`:
        (diameter, diameter_style).

        diameter_style comes from the image's style vector at the model's own scale; diameter is the
        median mask diameter (`cpsam.size.median_diameter`) of a segmentation at diameter_style, or the
        size model's diam_mean when that finds no cells. Deviation: the refining segmentation resizes
        flows back to the image before the dynamics (cellpose 3 runs them at the network's scale with
        interp=False); the result agrees with cellpose 3.1.1.2 within 2 % (tests/cpsam/test_size.py).
        Raises ValueError without a size model, ImageError for an unusable image.
        """
        if self.size_model is None:
            raise ValueError("this model has no size model: give a diameter")
        common = dict(channels=channels, channel_axis=channel_axis, augment=augment, estimate_diameters=False)
        first = self.segment([image], compute_masks=False, **common)[0]
        assert first.style is not None
        size = self.size_model
        diam_style = size.style_diameter(first.style)
        diam_mean = float(self.model.diam_mean.detach().float().cpu()[0])
        # cellpose rescales by the size model's diam_mean / diam_style; a diameter in the model's terms:
        refine = self.segment([image], diameter=diam_style * diam_mean / size.diam_mean, **common)[0]
        diam = median_diameter(refine.masks)
        return (size.diam_mean if diam == 0 or math.isnan(diam) else diam), diam_style

    def rescale_for(self, diameter: float | None) -> float:
        """Resize factor for a given cell diameter: diam_mean / diameter (diam_mean / diam_labels if None)."""
        diam_mean = float(self.model.diam_mean.detach().float().cpu()[0])
        if diameter is None or diameter <= 0:
            diameter = float(self.model.diam_labels.detach().float().cpu()[0])
        if self.rules.float32_rescale:
            return float(np.float32(diam_mean) / np.float32(diameter))
        return diam_mean / float(diameter)

    def segment_window(
        self,
        read: Callable[[int, int, int, int], np.ndarray],
        shape: tuple[int, int],
        window: tuple[int, int, int, int],
        *,
        normalization: Sequence[tuple[float, float] | None],
        diameter: float | None = None,
        channels: Sequence[int] | None = None,
        augment: bool = False,
        compute_masks: bool = True,
        niter: int | None = None,
        flow_threshold: float | None = None,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        max_size_fraction: float = 0.4,
    ) -> SegmentResult:
        """Segment the rectangle `window` = (y0, y1, x0, x1) of an (H, W) = `shape` image as `segment` would
        segment the whole image, reading only the pixels it needs (`cpsam.window`: the whole image's resize
        and tile grid, the tiles touching the window at their global positions and flips).

        Args:
            read: read(y0, y1, x0, x1) -> the image's pixels there, (h, w) or channels-last (h, w, C).
            shape: (H, W) of the whole image.
            normalization: the whole image's bounds per network input channel (see `segment`); required,
                since the window's own percentiles would not be the whole image's.
            diameter: as `segment` (None or 0: the model's own; no size-model estimate on a window).
            channels, augment, compute_masks, niter, flow_threshold, cellprob_threshold, min_size: as `segment`.
            max_size_fraction: of the WHOLE image (masks over max_size_fraction * H * W pixels are removed).
        Returns a SegmentResult whose masks (ids 1..N of this window), dP and cellprob cover the window; its
        flows equal the whole image's flows there to float rounding. Masks equal the whole image's away from
        the window's edges (objects the edge cuts, and pixels whose trajectories would leave it, can differ).
        Raises ImageError for unusable pixels, ValueError for a window outside the image.
        """
        if channels is None:
            channels = self.default_channels
        rescale = self.rescale_for(diameter)
        with self._stage("resize"):
            try:
                scaled = transforms.scaled_shape(*shape, rescale) if rescale != 1.0 else tuple(shape)
            except ValueError as exc:
                raise ImageError(str(exc)) from exc
            plan = plan_window(tuple(shape), tuple(window), scaled, self.rules.tile_size, self.rules.pad_to_tile,
                               self.tile_overlap, augment)
        with self._stage("read"):
            image = read(*plan.source)
        x = self._normalized(image, channels, 2 if image.ndim == 3 else None, normalization)
        del image
        with self._stage("resize"):
            py, px = plan.y, plan.x
            x = resize_window(x, (py.source[0], px.source[0]), tuple(shape), scaled, (*py.input, *px.input))
            chw = np.zeros((x.shape[2], py.extent[1] - py.extent[0], px.extent[1] - px.extent[0]), np.float32)
            top, left = py.input[0] + py.pad - py.extent[0], px.input[0] + px.pad - px.extent[0]
            chw[:, top : top + x.shape[0], left : left + x.shape[1]] = x.transpose(2, 0, 1)
            del x
        state = _InFlight(
            index=0, shape=tuple(shape), rescale=rescale, niter=self._niter(rescale, niter), pads=(0, 0, 0, 0),
            scaled=scaled, ystarts=py.starts, xstarts=px.starts, tile_hw=(py.tile, px.tile), image=chw,
            diameter=self._used_diameter(diameter), tile_origin=(py.first_tile, px.first_tile), window=plan,
            style_sum=np.zeros(self.style_channels, np.float32) if self.style_channels else None,
        )
        (state,) = self._run_tiles(iter([state]), augment)
        window_area = (window[1] - window[0]) * (window[3] - window[2])
        mask_kwargs = dict(flow_threshold=self.flow_threshold if flow_threshold is None else flow_threshold,
                           cellprob_threshold=cellprob_threshold, min_size=min_size,
                           max_size_fraction=max_size_fraction * shape[0] * shape[1] / window_area)
        return self._finish(state, compute_masks, mask_kwargs)

    # ------------------------------------------------------------------ pipeline steps
    def _prepare(
        self,
        index: int,
        image: np.ndarray,
        diameter: float | None,
        channels: Sequence[int] | None,
        channel_axis: int | None,
        augment: bool,
        niter: int | None,
        normalization: Sequence[tuple[float, float] | None] | None = None,
    ) -> _InFlight:
        """Channels -> normalize -> rescale -> pad; plan the tile grid of one image."""
        x = self._normalized(image, channels, channel_axis, normalization)
        height, width = x.shape[:2]
        with self._stage("resize"):
            rescale = self.rescale_for(diameter)
            scaled = (height, width)
            if rescale != 1.0:
                try:
                    scaled = transforms.scaled_shape(height, width, rescale)
                except ValueError as exc:
                    raise ImageError(str(exc)) from exc
                x = transforms.resize_image(x, *scaled)
            tile = self.rules.tile_size
            pads = transforms.get_pad_yx(*scaled, tile_size=tile if self.rules.pad_to_tile else None)
            ly, lx = scaled[0] + pads[0] + pads[1], scaled[1] + pads[2] + pads[3]
            # Augmentation tiles need at least one full tile: pad the bottom/right, crop it off later.
            extra_y, extra_x = (max(0, tile - ly), max(0, tile - lx)) if augment else (0, 0)
            chw = np.zeros((x.shape[2], ly + extra_y, lx + extra_x), np.float32)
            chw[:, pads[0] : pads[0] + scaled[0], pads[2] : pads[2] + scaled[1]] = x.transpose(2, 0, 1)
            del x
        ystarts = transforms.tile_starts(ly, tile, self.tile_overlap, augment)
        xstarts = transforms.tile_starts(lx, tile, self.tile_overlap, augment)
        tile_hw = (min(tile, chw.shape[1]), min(tile, chw.shape[2]))
        return _InFlight(
            index=index, shape=(height, width), rescale=rescale, niter=self._niter(rescale, niter), pads=pads,
            scaled=scaled, ystarts=ystarts, xstarts=xstarts, tile_hw=tile_hw, image=chw,
            diameter=self._used_diameter(diameter),
            style_sum=np.zeros(self.style_channels, np.float32) if self.style_channels else None,
        )

    def _normalized(self, image: np.ndarray, channels: Sequence[int] | None, channel_axis: int | None,
                    normalization: Sequence[tuple[float, float] | None] | None) -> np.ndarray:
        """Checks -> channels -> normalization (the image's own percentiles, or the given bounds): (H, W, C)
        float32 with C = in_channels. Raises ImageError."""
        with self._stage("normalize"):
            image = check_image(image)
            try:
                hwc = transforms.to_channels_last(image, channel_axis)
                x = transforms.select_channels(hwc, channels, self.in_channels)  # a fresh float32 copy
                if normalization is None:
                    return transforms.normalize_percentile(x, inplace=True)
                return transforms.normalize_with_bounds(x, normalization, inplace=True)
            except ValueError as exc:
                raise ImageError(str(exc)) from exc

    def _niter(self, rescale: float, niter: int | None) -> int:
        """Euler steps: the given ones, else 200 / rescale truncated (in float32 under the cellpose-3 rules)."""
        if niter is None or niter == 0:
            if self.rules.float32_rescale:  # cellpose 3: niter = 1 / rescale * 200 in float32
                return int(np.float32(1.0) / np.float32(rescale) * np.float32(DEFAULT_NITER))
            return int(DEFAULT_NITER / rescale)
        return int(niter)

    def _used_diameter(self, diameter: float | None) -> float:
        if diameter is not None and diameter > 0:
            return float(diameter)
        return float(self.model.diam_labels.detach().float().cpu()[0])

    def _tiles(self, state: _InFlight, augment: bool) -> Iterator[tuple[np.ndarray, int, int, bool, bool]]:
        """Cut the tiles of one image: (tile (C, h, w), y0, x0, flip_y, flip_x); frees the input after."""
        assert state.image is not None
        th, tw = state.tile_hw
        state.accum = np.zeros((3, *state.image.shape[1:]), np.float32)
        state.remaining = len(state.ystarts) * len(state.xstarts)
        for row, y0 in enumerate(state.ystarts):
            for col, x0 in enumerate(state.xstarts):
                tile = state.image[:, y0 : y0 + th, x0 : x0 + tw]
                flip_y, flip_x = (transforms.flip_pattern(row + state.tile_origin[0], col + state.tile_origin[1])
                                  if augment else (False, False))
                if flip_y:
                    tile = tile[:, ::-1]
                if flip_x:
                    tile = tile[:, :, ::-1]
                yield tile, int(y0), int(x0), flip_y, flip_x
        state.image = None

    def _run_tiles(self, states: Iterator[_InFlight], augment: bool) -> Iterator[_InFlight]:
        """Feed tiles of consecutive images through the network in shared batches; yield each image's
        state as soon as its last tile has been accumulated (input order is kept)."""
        batch: list[tuple[_InFlight, np.ndarray, int, int, bool, bool]] = []
        pending: list[_InFlight] = []

        def flush() -> Iterator[_InFlight]:
            if batch:
                self._forward_batch(batch)
                batch.clear()
            while pending and pending[0].remaining == 0:
                yield pending.pop(0)

        for state in states:
            pending.append(state)
            if state.error is not None:
                continue
            for tile, y0, x0, flip_y, flip_x in self._tiles(state, augment):
                if batch and (len(batch) == self.batch_size or batch[0][1].shape != tile.shape):
                    yield from flush()
                batch.append((state, tile, y0, x0, flip_y, flip_x))
        yield from flush()

    def _taper(self, h: int, w: int) -> torch.Tensor:
        """(h, w) float32 blending mask on the device (outer product of the 1-D tapers)."""
        key = (h, w)
        if key not in self._tapers:
            mask = np.outer(transforms.taper_1d(h), transforms.taper_1d(w)).astype(np.float32)
            self._tapers[key] = torch.from_numpy(mask).to(self.device)
        return self._tapers[key]

    @torch.inference_mode()
    def _forward_batch(self, batch: list[tuple[_InFlight, np.ndarray, int, int, bool, bool]]) -> None:
        """Run one batch of same-size tiles; add taper-weighted outputs into their images' accumulators."""
        with self._stage("tiles"):
            x = torch.from_numpy(np.stack([item[1] for item in batch])).to(self.device, self.dtype)
        with self._stage("network"):
            outputs = [self.model(part)[:2] for part in (x.split(CPU_SUB_BATCH) if x.device.type == "cpu" else [x])]
            y = torch.cat([out[0][:, :3].float() for out in outputs])
        with self._stage("tiles"):
            self._accumulate(batch, outputs, y)

    def _accumulate(self, batch: list[tuple[_InFlight, np.ndarray, int, int, bool, bool]],
                    outputs: list[tuple[torch.Tensor, ...]], y: torch.Tensor) -> None:
        """Sum the tiles' styles; unflip, taper and add the outputs `y` (B, 3, h, w) into the accumulators."""
        if self.style_channels:
            styles = torch.cat([out[1].float() for out in outputs]).cpu().numpy()
            for k, item in enumerate(batch):
                assert item[0].style_sum is not None
                item[0].style_sum += styles[k]
        for k, (_, _, _, _, flip_y, flip_x) in enumerate(batch):
            if flip_y or flip_x:
                y[k] = transforms.unflip_output(y[k], flip_y, flip_x)
        y = (y * self._taper(*y.shape[-2:])).cpu().numpy()
        th, tw = y.shape[-2:]
        for k, (state, _, y0, x0, _, _) in enumerate(batch):
            assert state.accum is not None
            state.accum[:, y0 : y0 + th, x0 : x0 + tw] += y[k]
            state.remaining -= 1

    def _finish(self, state: _InFlight, compute_masks: bool, mask_kwargs: dict) -> SegmentResult:
        """Normalize the blend, crop the padding, resize to the image and run the dynamics.

        Without resizing, dP and cellprob are views into the (slightly larger, padded) accumulator:
        no copy of the flows is made.
        """
        accum = state.accum
        assert accum is not None
        state.accum = None
        with self._stage("tiles"):
            th, tw = state.tile_hw
            wy = transforms.blend_weight_1d(accum.shape[1], state.ystarts, th)
            wx = transforms.blend_weight_1d(accum.shape[2], state.xstarts, tw)
            if state.window is None:  # the whole resized image
                top, _, left, _ = state.pads
                ys, xs = slice(top, top + state.scaled[0]), slice(left, left + state.scaled[1])
            else:  # the resized pixels the window's resize reads (every tile covering them was run)
                py, px = state.window.y, state.window.x
                ys = slice(py.resized[0] + py.pad - py.extent[0], py.resized[1] + py.pad - py.extent[0])
                xs = slice(px.resized[0] + px.pad - px.extent[0], px.resized[1] + px.pad - px.extent[0])
            flows = accum[:, ys, xs]
            # Divide by the separable weight sum one axis at a time: no full-size weight image.
            flows /= wy[ys, None]
            flows /= wx[None, xs]
            del accum
        if state.window is not None and state.scaled != state.shape:
            with self._stage("resize"):
                py, px = state.window.y, state.window.x
                flows = np.stack([resize_window(flows[c], (py.resized[0], px.resized[0]), state.scaled, state.shape,
                                                (*py.window, *px.window)) for c in range(3)])
        elif state.window is None and state.scaled != state.shape:
            with self._stage("resize"):
                # One channel at a time (bounded memory); equal to cellpose's 3-channel resize to
                # float rounding (tests compare to 1e-5).
                resized = np.empty((3, *state.shape), np.float32)
                for c in range(3):
                    resized[c] = transforms.resize_image(np.ascontiguousarray(flows[c]), *state.shape)
                flows = resized
        dP, cellprob = flows[:2], flows[2]
        if compute_masks:
            from cpsam.dynamics import flows_to_masks  # numba (~1 s) only once masks are asked for

            threads = torch.get_num_threads()
            with self._stage("masks"):
                masks = flows_to_masks(
                    dP, cellprob, niter=state.niter, device=self.masks_device, rules=self.rules.mask_rules,
                    **mask_kwargs
                )
            # numba's OpenMP threading layer shares torch's OpenMP runtime and sets its own thread count there;
            # CPU kernels round differently with the thread count, so the next image's network would depend on
            # whether this one ran parallel dynamics (and N processes with OMP_NUM_THREADS=1 would oversubscribe)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        else:
            masks = np.zeros((0, 0), np.uint16)
        style = None
        if state.style_sum is not None:  # cellpose 3's run_net: the tiles' styles summed, L2-normalized
            norm = float(np.sqrt((state.style_sum.astype(np.float64) ** 2).sum()))
            style = state.style_sum / np.float32(norm) if norm > 0 else state.style_sum
        return SegmentResult(
            masks=masks, dP=dP, cellprob=cellprob, rescale=state.rescale, niter=state.niter,
            diameter=state.diameter, diameter_source=state.diameter_source, style=style,
            diameter_style=state.diameter_style,
        )


def tiles_per_image(shape: tuple[int, int], rescale: float, rules: InferenceRules, augment: bool = False,
                    tile_overlap: float = 0.1) -> int:
    """How many network tiles an (H, W) image costs under `rules` (for planning batch sizes)."""
    scaled = transforms.scaled_shape(*shape, rescale) if rescale != 1.0 else shape
    pads = transforms.get_pad_yx(*scaled, tile_size=rules.tile_size if rules.pad_to_tile else None)
    ly, lx = scaled[0] + pads[0] + pads[1], scaled[1] + pads[2] + pads[3]
    ny = len(transforms.tile_starts(ly, rules.tile_size, tile_overlap, augment))
    nx = len(transforms.tile_starts(lx, rules.tile_size, tile_overlap, augment))
    return int(math.prod((ny, nx)))
