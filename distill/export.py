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
6. flows -> masks: `cpsam.dynamics.torch_rules.flows_to_masks` under the rules' mask rule set (cp3 or cp4),
   the torch implementation that `cpsam.dynamics` runs on a torch device (Euler steps, seeds, flow-error QC,
   hole filling, small-mask filter; see that module), at the model's flow threshold
   (`cpsam.segment.recorded_flow_threshold`: a distilled student's calibrated one, else 0.4) unless the call
   passes one >= 0.
Outside (the caller): reading the file and making a float32 tensor of it; choosing cellpose-3 `channels`
pairs (pass the channels in the order the network wants them); the diameter (no size model inside: give
one, or 0 for the model's own); test-time augmentation (not supported).
Returns masks (H, W) int32 labels 1..N (0 = background) and flows (3, H, W) float32 [dY, dX, cellprob].
Checked against `cpsam segment` on real images (tests/distill/test_distill_export.py). Only TorchScript is
written: the tiling and the dynamics are loops over data-dependent sizes that ONNX graphs cannot hold,
and the `onnx` package is not part of this project's environment.
`--format bioimageio` wraps the same module into a BioImage.IO model package (distill/bioimageio_package.py).
The module runs on the device of its input (tensors it makes are made there).
"""

from __future__ import annotations

import argparse
import io as stdio
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsam import io
from cpsam.cli_types import non_negative_float, positive_int
from cpsam.dynamics.torch_rules import flows_to_masks as flows_to_masks_torch
from cpsam.models import resolve_model
from cpsam.models.cpnet import CPnet
from cpsam.segment import CPU_SUB_BATCH, DEFAULT_FLOW_THRESHOLD, InferenceRules, recorded_flow_threshold, rules_for

# TorchScript functions cannot read module globals: the constants below are repeated as locals where used
# (cpsam.transforms' PERCENTILE_SUBSAMPLE_ABOVE = 224**3, PERCENTILE_SUBSAMPLE_STEP = 224, PAD_DIV = 16).


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
    out = torch.zeros((in_channels, x.shape[1], x.shape[2]), dtype=torch.float32, device=x.device)
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
        q = torch.quantile(sample.reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float32, device=x.device))
        low, high = q[0], q[1]
        if float(high - low) > 1e-3:
            out[c] = (channel - low) / (high - low)
    return out


def _linear_taps(src: int, dst: int, float32_coordinates: bool,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OpenCV INTER_LINEAR taps along one axis: (i0, i1 int64, w0, w1 float64, on `device`) for `dst` outputs
    from `src`.

    Source coordinate (d + 0.5) * src / dst - 0.5 (rounded to float32 first on OpenCV's generic path),
    clamped at both ends to the edge pixel with weight 1.
    """
    d = torch.arange(dst, dtype=torch.float64, device=device)
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
    xi0, xi1, xw0, xw1 = _linear_taps(x.shape[2], width, generic, x.device)
    yi0, yi1, yw0, yw1 = _linear_taps(x.shape[1], height, generic, x.device)
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


def _taper(length: int, device: torch.device) -> Tensor:
    """The 1-D sigmoid taper (float64, on `device`) of `cpsam.transforms.taper_1d`."""
    size = max(224, length)
    t = torch.arange(size, dtype=torch.float64, device=device)
    dist = torch.abs(t - t.mean())
    full = 1.0 / (1.0 + torch.exp((dist - (size / 2 - 20)) / 7.5))
    start = size // 2 - length // 2
    return full[start : start + length]


def _blend_weight(length: int, starts: list[int], tile_len: int, device: torch.device) -> Tensor:
    """Sum of the tiles' 1-D tapers along one axis (float64, `length`, on `device`)."""
    total = torch.zeros(length, dtype=torch.float64, device=device)
    taper = _taper(tile_len, device)
    for s in starts:
        total[s : s + tile_len] = total[s : s + tile_len] + taper
    return total


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
                 rules: InferenceRules, net_stride: int, batch_size: int = 8, tile_overlap: float = 0.1,
                 flow_threshold: float = DEFAULT_FLOW_THRESHOLD) -> None:
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
        self.flow_threshold = float(flow_threshold)  # used when a call passes a negative one (its default)

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
        return self.flows_chw(_channels_first(image, self.in_channels), diameter)

    @torch.jit.export
    def flows_chw(self, image: Tensor, diameter: float = 0.0) -> tuple[Tensor, float]:
        """`flows` of an image whose channels are already the network's: (in_channels, H, W) float32 (steps 2-5
        of the module docstring; no guess of the channel axis). Runs on the image's device."""
        x = _normalize(image.to(torch.float32))
        device = x.device
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
        taper = (_taper(th, device)[:, None] * _taper(tw, device)[None, :]).to(torch.float32)
        accum = torch.zeros((3, ly, lx), dtype=torch.float32, device=device)
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
        wy = _blend_weight(ly, ys, th, device)[top : top + sh]
        wx = _blend_weight(lx, xs, tw, device)[left : left + sw]
        flows = accum[:, top : top + sh, left : left + sw]
        flows = (flows.double() / wy[None, :, None]).float()
        flows = (flows.double() / wx[None, None, :]).float()
        if sh != height or sw != width:
            # OpenCV resizes the flows one 2-D channel at a time (Segmenter._finish)
            flows = torch.cat([_resize(flows[c : c + 1].contiguous(), height, width) for c in range(3)])
        return flows, rescale

    def forward(self, image: Tensor, diameter: float = 0.0, niter: int = 0, cellprob_threshold: float = 0.0,
                flow_threshold: float = -1.0, min_size: int = 15,
                max_size_fraction: float = 0.4) -> tuple[Tensor, Tensor]:
        """Segment one image: (H, W) or 3-D float tensor as read; diameter in px (0: the model's own);
        flow_threshold < 0: the model's (`cpsam.segment.recorded_flow_threshold`, stored at export).

        Returns masks (H, W) int32 (0 = background, 1..N) and flows (3, H, W) float32.
        """
        flows, rescale = self.flows(image, diameter)
        masks = self.masks(flows, rescale, niter, cellprob_threshold, flow_threshold, min_size, max_size_fraction)
        return masks, flows

    @torch.jit.export
    def masks(self, flows: Tensor, rescale: float, niter: int = 0, cellprob_threshold: float = 0.0,
              flow_threshold: float = -1.0, min_size: int = 15, max_size_fraction: float = 0.4) -> Tensor:
        """flows (3, H, W) of `flows` / `flows_chw` -> masks (H, W) int32 (step 6; niter 0: 200 / rescale;
        flow_threshold < 0: the model's)."""
        steps = niter if niter > 0 else self.default_niter(rescale)
        if flow_threshold < 0:
            flow_threshold = self.flow_threshold
        with torch.no_grad():
            masks = flows_to_masks_torch(flows[:2].contiguous(), flows[2].contiguous(), steps,
                                         cellprob_threshold, flow_threshold, min_size, max_size_fraction,
                                         self.mask_rules)
        return masks.to(torch.int32)


def named_rules(name: str, tile_size: int) -> InferenceRules:
    """The complete cellpose 3 ("cp3": tiles shrink to small images, float32 rescale, cp3 masks) or cellpose 4
    ("cp4": small images padded to a tile, float64 rescale, cp4 masks) rule set, with this tile size."""
    if name not in ("cp3", "cp4"):
        raise ValueError(f"rules must be cp3 or cp4, got {name!r}")
    cp3 = name == "cp3"
    return InferenceRules(tile_size=tile_size, pad_to_tile=not cp3, float32_rescale=cp3, mask_rules=name)


def network_stride(model: nn.Module) -> int:
    """The multiple H and W of a network input must be: 2**(levels - 1) for a CPnet, `stride` for FastNet."""
    if isinstance(model, CPnet):
        return 2 ** (len(model.nbase) - 2)
    return int(getattr(model, "stride", 16))


def build_segmenter(model: nn.Module, rules: InferenceRules | None = None, batch_size: int = 8) -> ExportedSegmenter:
    """`model` (a CPnet or FastNet with the cpsam model interface) as an `ExportedSegmenter` around its traced
    network (CPU, float32, BatchNorm folded where the model can), not yet scripted.

    rules: the inference rules to reproduce (default: `rules_for(model)`, what `cpsam segment` uses).
    Raises ValueError for a model without the cpsam model interface.
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
    return ExportedSegmenter(traced, int(model.in_channels), tile, float(model.diam_mean.detach()[0]),
                             float(model.diam_labels.detach()[0]), rules, stride, batch_size,
                             flow_threshold=recorded_flow_threshold(model))


def script_bytes(module: nn.Module) -> bytes:
    """`torch.jit.script(module)` serialized (what `torch.jit.load` reads)."""
    buffer = stdio.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return bytes(buffer.getbuffer())


def export_model(model: nn.Module, out: str | Path, rules: InferenceRules | None = None, batch_size: int = 8) -> Path:
    """Write `model` (a CPnet or FastNet; eval mode, CPU) as one TorchScript file `out` (atomically).

    rules: the inference rules to reproduce (default: `rules_for(model)`, what `cpsam segment` uses).
    Returns the written path. Raises ValueError for a model without the cpsam model interface and OSError
    (naming `out`) when the file cannot be written, e.g. a full disk; no partial file is left.
    """
    data = script_bytes(build_segmenter(model, rules, batch_size))
    # serialized in memory, then written by Python: TorchScript's own file writer aborts the process (C++
    # "terminate called") when the disk fills, where a Python write raises OSError and atomic_path cleans up
    with io.atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return Path(out)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cpsam distill export`."""
    parser.add_argument("--model", required=True, help="model file, run folder or pretrained name (e.g. RUN/model.pt)")
    parser.add_argument("--out", type=Path, required=True,
                        help="torchscript: the file to write (e.g. student.pt); bioimageio: a .zip file, or a folder "
                             "for any other name (see distill/bioimageio_package.py)")
    parser.add_argument("--format", choices=("torchscript", "bioimageio"), default="torchscript",
                        help="torchscript (default): one file, image + diameter -> (masks, flows); bioimageio: a "
                             "BioImage.IO model package (rdf.yaml, TorchScript weights raw image -> label image, "
                             "test tensors, cover, citations, license)")
    parser.add_argument("--rules", choices=("auto", "cp3", "cp4"), default="auto",
                        help="inference rules: auto = what `cpsam segment` uses for this model (cp3 for a CPnet); "
                             "cp3 / cp4 = cellpose 3's / 4's tiling, rescaling and flow -> mask rules (a student "
                             "runs best under its teacher's: cp3 for cyto_0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="tiles per network call inside the file")
    parser.add_argument("--test-image", type=Path, default=None,
                        help="bioimageio only (required there): a real image whose centre crop (<= 256 px a side) "
                             "becomes the package's test input; the model must find cells in it")
    parser.add_argument("--diameter", type=non_negative_float, default=0.0,
                        help="bioimageio only: the cell diameter in px fixed inside the package (0: the model's own)")


def _fail_usage(message: str) -> int:
    print(f"cpsam distill export: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """`cpsam distill export`; 0 written, 2 bad request (unreadable model or test image, unwritable --out), 1 the
    write failed (e.g. a full disk; no partial file is left)."""
    bioimageio = args.format == "bioimageio"
    if bioimageio and args.test_image is None:
        return _fail_usage("--format bioimageio needs --test-image IMAGE (a real image the model finds cells in)")
    if not bioimageio and (args.test_image is not None or args.diameter):
        return _fail_usage("--test-image and --diameter apply to --format bioimageio only")
    try:
        if bioimageio:
            # the package module imports bioimageio.spec's schema only when it writes: cheap to import here
            from distill.bioimageio_package import check_package_path

            check_package_path(args.out)
        else:
            io.check_output_file(args.out)
    except io.OutputPathError as exc:
        return _fail_usage(f"cannot write --out {exc}")
    image = None
    if bioimageio:
        try:
            image = io.read_image(args.test_image)
        except (OSError, ValueError) as exc:  # InputFileError names the file and the problem
            return _fail_usage(f"--test-image {exc}")
    try:
        model = resolve_model(args.model, torch.device("cpu"))
    except (OSError, ValueError, RuntimeError) as exc:
        return _fail_usage(f"cannot load --model {args.model}: {exc}")
    rules = rules_for(model) if args.rules == "auto" else named_rules(args.rules, int(model.tile_size))
    try:
        if bioimageio:
            from distill.bioimageio_package import write_package  # same module as above

            path, n_cells = write_package(model, args.out, image, source=str(args.model), rules=rules,
                                          diameter=args.diameter, batch_size=args.batch_size)
        else:
            path = export_model(model, args.out, rules, batch_size=args.batch_size)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail_usage(f"{args.model}: {first}")
    except OSError as exc:
        what = io.describe_os_error(exc) if exc.filename else f"{args.out}: {io.describe_os_error(exc)}"
        print(f"cpsam distill export: cannot write --out {what}", file=sys.stderr)
        return 1
    where = (f"rules {rules.mask_rules}, tile {rules.tile_size}, "
             f"{'pad to tile' if rules.pad_to_tile else 'tiles shrink to small images'}")
    if bioimageio:
        kind = "zip file" if path.suffix.lower() == ".zip" else "folder"
        print(f"cpsam distill export: {args.model} -> {path} (BioImage.IO model package, {kind}; {where}; "
              f"test output {n_cells} cells)")
        return 0
    size = path.stat().st_size / 2**20
    print(f"cpsam distill export: {args.model} -> {path} ({size:.1f} MiB, TorchScript; {where})")
    return 0
