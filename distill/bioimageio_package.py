"""`cpsam distill export --format bioimageio`: a model as a BioImage.IO model package (format_version 0.5).

    cpsam distill export --model RUN --out student.zip --format bioimageio --test-image IMAGE   # one .zip file
    cpsam distill export --model RUN --out student_bioimageio --format bioimageio --test-image IMAGE   # a folder

The package (written by `bioimageio.spec`'s own model classes and packager, validated on writing):
- `rdf.yaml`: the model description (`bioimageio.spec.model.v0_5.ModelDescr`);
- `weights.pt`: TorchScript weights that hold the whole of `cpsam segment` for one diameter: the module
  `LabelImageModel` around `distill.export.ExportedSegmenter` (normalization, rescaling, tiling, the network,
  flows -> masks with `cpsam.dynamics.torch_rules`), so a BioImage.IO consumer (bioimageio.core, deepImageJ's
  TorchScript engine, ...) gets label images, not flows;
- input `raw`: the raw image, float32, axes (batch, channel, y, x), channel = the network's input channels in
  its order (cellpose 4's rule: the first channels; a grayscale image is channel 0 with the others zero), any
  size y, x >= 16 (whole images: the tiling is inside, so consumers must not block the image themselves);
- output `labels`: int32 (batch, channel = 1, y, x), 0 = background, 1..N one id per cell;
- `test_input.npy` / `test_output.npy`: a crop (at most 256 x 256 from the centre) of a real image given with
  --test-image and the packaged module's own output on it (computed by the serialized weights, re-loaded);
- `cover.png`: that crop with the outlines of the test output; `README.md`: the documentation;
- citations (Cellpose, Cellpose-SAM), license BSD-3-Clause, authors.
The diameter is fixed when the package is written (--diameter; 0: the model's own `diam_labels`) because a
BioImage.IO model takes tensors only. Test-time augmentation is not inside.
An --out ending in `.zip` gets a zip file, any other a folder (an existing folder is replaced only when it holds
an `rdf.yaml`, i.e. an earlier package). Both appear only when complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cpsam import io, transforms
from cpsam.segment import InferenceRules
from distill.export import ExportedSegmenter, build_segmenter, script_bytes

MIN_SIDE = 16  # the smallest y / x the package declares (rescaling, padding and tiling handle any size above)
TEST_SIDE = 256  # the test tensors are a centre crop of at most this side
LICENSE = "BSD-3-Clause"
CITATIONS = (
    ("Stringer, C., Wang, T., Michaelos, M. & Pachitariu, M. Cellpose: a generalist algorithm for cellular "
     "segmentation. Nature Methods 18, 100-106 (2021).", "10.1038/s41592-020-01018-x"),
    ("Pachitariu, M., Rariden, M. & Stringer, C. Cellpose-SAM: superhuman generalization for cellular "
     "segmentation. bioRxiv (2025).", "10.1101/2025.04.28.651001"),
)


class LabelImageModel(nn.Module):
    """raw (B, C, H, W) float tensor -> labels (B, 1, H, W) int32: `ExportedSegmenter` on each image at a fixed
    diameter (px; 0 = the model's own), with the default mask thresholds of `cpsam segment` (the model's flow
    threshold, see `cpsam.segment.recorded_flow_threshold`). Runs on the
    device of its input (the weights go where `torch.jit.load(map_location=...)` puts them)."""

    def __init__(self, segmenter: ExportedSegmenter, diameter: float) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.diameter = float(diameter)

    def forward(self, raw: Tensor) -> Tensor:
        if raw.dim() != 4 or raw.shape[1] != self.segmenter.in_channels:
            raise ValueError("expected a (batch, channel, y, x) tensor with the model's input channels")
        out: list[Tensor] = []
        for b in range(raw.shape[0]):
            flows, rescale = self.segmenter.flows_chw(raw[b], self.diameter)
            out.append(self.segmenter.masks(flows, rescale).unsqueeze(0))
        return torch.stack(out)


def package_test_input(image: np.ndarray, in_channels: int, side: int = TEST_SIDE) -> np.ndarray:
    """An image as read -> the package's test input: (1, in_channels, h, w) float32, channels chosen as
    `cpsam segment` does without --channels (`cpsam.transforms.select_channels`), a centre crop of at most
    `side` x `side`. Raises ValueError for an image under MIN_SIDE pixels a side or not 2-D / 3-D."""
    hwc = transforms.select_channels(transforms.to_channels_last(image), None, in_channels)
    h, w = hwc.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"the image is {h} x {w} pixels; the test image needs at least {MIN_SIDE} a side")
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    crop = hwc[top : top + side, left : left + side]
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)


def _documentation(name: str, source: str, rules: InferenceRules, diameter: float, in_channels: int,
                   n_cells: int, shape: tuple[int, ...], flow_threshold: float) -> str:
    diam = f"{diameter:g} px" if diameter > 0 else "the model's own diameter"
    return f"""# {name}

A cell segmentation model exported by `cpsam distill export --format bioimageio` from `{source}`.

## What it does
Input `raw`: the raw image (float32, axes batch, channel, y, x; {in_channels} channel(s) in the network's order,
a grayscale image is channel 0 with the others zero), a whole image of any size (y, x >= {MIN_SIDE}); do not
tile it, the tiling is inside. Output `labels`: int32 label image (0 background, 1..N one id per cell).
Inside the TorchScript weights: per-channel 1st/99th percentile normalization, rescaling to the model's cell
diameter (cells of {diam}), overlapping tiles of {rules.tile_size} px, the network, the Cellpose flows and
their dynamics to masks (rule set `{rules.mask_rules}`, flow threshold {flow_threshold:g}, cell probability
threshold 0).

## Validation
The test tensors are a {shape[-2]} x {shape[-1]} crop of a real image and this package's own output on it
({n_cells} cells). The masks were checked against `cpsam segment --model {source}` on real images
(AP@0.5 >= 0.99 in the cpsam test suite, tests/distill/test_distill_bioimageio.py). Validate a model on
your own images against manual masks (e.g. `cpsam eval`) before relying on it.

## Citation
Cite Cellpose (Stringer et al. 2021, doi 10.1038/s41592-020-01018-x) and Cellpose-SAM
(Pachitariu et al. 2025, doi 10.1101/2025.04.28.651001).
"""


def _describe(folder: Path, name: str, source: str, in_channels: int):
    """The v0_5 ModelDescr of the files in `folder` (validated by the constructor)."""
    # bioimageio.spec loads pydantic and its model schema (about a second): only when a package is written
    from bioimageio.spec.model import v0_5

    def axes(space: list) -> list:
        return [v0_5.BatchAxis(), *space]

    raw_id, labels_id = v0_5.TensorId("raw"), v0_5.TensorId("labels")
    inputs = [v0_5.InputTensorDescr(
        id=raw_id,
        description="raw image, channels in the network's order (not normalized: normalization is inside)",
        axes=axes([v0_5.ChannelAxis(channel_names=[v0_5.Identifier(f"channel{c}") for c in range(in_channels)]),
                   v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=v0_5.ParameterizedSize(min=MIN_SIDE, step=1)),
                   v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=v0_5.ParameterizedSize(min=MIN_SIDE, step=1))]),
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
    )]
    outputs = [v0_5.OutputTensorDescr(
        id=labels_id,
        description="instance label image: 0 background, 1..N one id per cell",
        axes=axes([v0_5.ChannelAxis(channel_names=[v0_5.Identifier("labels")]),
                   v0_5.SpaceOutputAxis(id=v0_5.AxisId("y"),
                                        size=v0_5.SizeReference(tensor_id=raw_id, axis_id=v0_5.AxisId("y"))),
                   v0_5.SpaceOutputAxis(id=v0_5.AxisId("x"),
                                        size=v0_5.SizeReference(tensor_id=raw_id, axis_id=v0_5.AxisId("x")))]),
        test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type="int32", range=(0, None)),
    )]
    try:
        return _model_descr(v0_5, folder, name, source, inputs, outputs)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        if "index_key" not in str(exc):
            raise
        import bioimageio.spec
        import pydantic

        raise ValueError(f"bioimageio.spec {bioimageio.spec.__version__} cannot build a model description with "
                         f"pydantic {pydantic.VERSION} (its file serializer needs pydantic < 2.14); install the "
                         "versions pyproject.toml pins") from exc


def _model_descr(v0_5, folder: Path, name: str, source: str, inputs: list, outputs: list):
    """The ModelDescr of `_describe` (validated by its constructor)."""
    return v0_5.ModelDescr(
        name=name,
        description=f"Cellpose-style cell segmentation (flows and their dynamics inside), exported from {source} "
                    "by cpsam; input a raw image, output a label image.",
        authors=[v0_5.Author(name="cpsam contributors")],
        cite=[v0_5.CiteEntry(text=text, doi=v0_5.Doi(doi)) for text, doi in CITATIONS],
        license=LICENSE,
        documentation=v0_5.FileDescr(source=folder / "README.md"),
        covers=[v0_5.FileDescr(source=folder / "cover.png")],
        tags=["cellpose", "cell-segmentation", "instance-segmentation", "2d", "pytorch", "torchscript"],
        inputs=inputs,
        outputs=outputs,
        weights=v0_5.WeightsDescr(torchscript=v0_5.TorchscriptWeightsDescr(
            source=folder / "weights.pt", pytorch_version=v0_5.Version(torch.__version__.split("+")[0]))),
    )


@contextlib.contextmanager
def _staging(beside: Path):
    """A fresh hidden folder beside `beside`, removed when the block ends (whatever happens)."""
    folder = beside.with_name(f".{beside.name}.{secrets.token_hex(4)}.part")
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _replaceable(out: Path) -> str | None:
    """Why the folder package cannot be written at `out`, or None."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder (give a new folder, or a .zip file name)"
    if out.is_dir() and any(out.iterdir()) and not (out / "rdf.yaml").is_file():
        return "is a folder that holds something other than a BioImage.IO package (give a new folder)"
    return None


def check_package_path(out: str | os.PathLike[str]) -> Path:
    """Check that a package can be written at `out` (a .zip file or a folder; see the module docstring).
    Raises io.OutputPathError saying what is wrong."""
    out = Path(out)
    if out.suffix.lower() == ".zip":
        return io.check_output_file(out)
    problem = _replaceable(out)
    if problem:
        raise io.OutputPathError(out, problem)
    io.check_output_dir(out.parent)
    return out


def write_package(model: nn.Module, out: str | os.PathLike[str], image: np.ndarray, *, source: str,
                  rules: InferenceRules | None = None, diameter: float = 0.0, batch_size: int = 8,
                  name: str | None = None, test_side: int = TEST_SIDE) -> tuple[Path, int]:
    """Write `model` (a CPnet or FastNet with the cpsam model interface) as a BioImage.IO package at `out` (a
    `.zip` file, else a folder), with test tensors from `image` (as read; see `package_test_input`, crops of at most
    `test_side` a side).

    source: how the model was named (recorded in the description). Returns (the package path, the number of
    cells in the test output). Raises ValueError (a bad model or image, or a description that bioimageio.spec
    rejects) and OSError (the write failed); nothing is left at `out` then (a replaced folder package stays
    as it was).
    """
    out = Path(out)
    segmenter = build_segmenter(model, rules, batch_size)
    weights = script_bytes(LabelImageModel(segmenter, diameter))
    raw = package_test_input(image, segmenter.in_channels, test_side)
    # the test output is what the serialized weights compute, re-loaded as a consumer loads them
    packaged = torch.jit.load(BytesIO(weights))
    with torch.no_grad():
        labels = packaged(torch.from_numpy(raw)).numpy()
    n_cells = int(labels.max())
    if n_cells == 0:  # BioImage.IO refuses an all-zero test output (nothing to test against)
        raise ValueError("the model finds no cells in the test image's crop; give another --test-image")
    name = name or f"cpsam {Path(source).parent.name if Path(source).name == 'model.pt' else Path(source).stem}"
    with _staging(out) as stage:
        (stage / "weights.pt").write_bytes(weights)
        np.save(stage / "test_input.npy", raw)
        np.save(stage / "test_output.npy", labels)
        io.write_png(stage / "cover.png", io.outline_overlay(raw[0], labels[0, 0], channel_axis=0))
        rule_set = rules if rules is not None else InferenceRules(
            tile_size=segmenter.tile_size, pad_to_tile=segmenter.pad_to_tile,
            float32_rescale=segmenter.float32_rescale, mask_rules=segmenter.mask_rules)
        (stage / "README.md").write_text(_documentation(name, source, rule_set, diameter, segmenter.in_channels,
                                                        n_cells, raw.shape, segmenter.flow_threshold))
        descr = _describe(stage, name, source, segmenter.in_channels)
        _save(descr, out, stage)
    return out, n_cells


def _save(descr, out: Path, stage: Path) -> None:
    """Package `descr` at `out` with bioimageio.spec's packager: a zip written atomically, or a folder built
    beside `out` and renamed onto it (an earlier package folder there is replaced)."""
    # bioimageio.spec: only when a package is written (see _describe)
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

    if out.suffix.lower() == ".zip":
        with io.atomic_path(out) as tmp:
            tmp.unlink()  # the packager writes a new file
            save_bioimageio_package(descr, output_path=tmp)
        return
    built = stage.with_name(stage.name + "-package")
    try:
        save_bioimageio_package_as_folder(descr, output_path=built)
        old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
        if out.exists():
            out.rename(old)
        try:
            built.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(built, ignore_errors=True)
