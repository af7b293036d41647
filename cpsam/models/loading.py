"""Weight files: recognise what a file is, load it into the right network, or say clearly why not.

Kinds of file understood (see `identify_checkpoint`):

- ``"cpsam-checkpoint"``: ours, written by `save_checkpoint` ({"format": "cpsam-checkpoint", ...}).
- ``"cellpose-sam"``: official Cellpose-SAM files (`cpsam`, `cpsam_v2`): a bare state_dict with
  `W2`, `encoder.*`, `out.*`, possibly prefixed `module.` (DataParallel).
- ``"sam"``: Segment Anything checkpoints (`sam_vit_{b,l,h}_*.pth`), used as training initialization.
- ``"cellpose-classic"``: Cellpose 1-3 CPnet files (cyto, cyto2, cyto3, nuclei, ...).
- ``"cellpose-dino"``: cellpose 4.2's CPDINO files (recognised only to be refused with a clear message).

Every failure raises `CheckpointError` (a ValueError) naming the file, what it looks like and what
was expected, instead of a raw KeyError/RuntimeError from torch.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpsam.io import atomic_path
from cpsam.models.cellpose_sam import CellposeSAM, CellposeSAMConfig
from cpsam.models.cpnet import cpnet_from_state_dict
from cpsam.models.registry import create_model

CHECKPOINT_FORMAT = "cpsam-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
# Keys that official files may carry but that the network does not use (cpsam_recipe.md 1.4):
# the paper's training class had an unused size embedding.
IGNORABLE_CPSAM_KEYS = frozenset({"encoder.size_embed"})

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked; the message names the file and the problem."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}")


_MAGIC = (
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"BM", "a BMP image"), (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (e.g. Keras weights)"), (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a zip archive"),
)


def sniff_file(path: str | os.PathLike[str]) -> str:
    """What a file looks like from its first bytes: 'a TIFF image', 'a text file starting "..."', ..."""
    with open(path, "rb") as fh:
        head = fh.read(256)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:1] == b"\x80":
        return "a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    if text.isprintable() or all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        first = " ".join(text.split())[:40]
        return f"a text file starting {first!r}"
    return "binary data of an unknown kind"


def _load_problem(path: Path, size: int, exc: Exception) -> str:
    """One sentence for a failed weights-only torch.load, without torch's advice to load unsafely."""
    detail = str(exc).strip()
    first = detail.splitlines()[0] if detail else type(exc).__name__
    kind = sniff_file(path)
    if "Weights only load failed" in first:
        if kind == "a zip archive" or kind == "a Python pickle":
            what = "a torch file" if kind == "a zip archive" else kind
            return (f"not a readable torch weight file ({size} bytes): {what} holding Python objects other "
                    "than tensors, which the safe (weights-only) loader refuses")
        return f"not a readable torch weight file ({size} bytes): it is {kind}"
    if kind == "a zip archive" or isinstance(exc, EOFError):
        return f"truncated or corrupt torch file ({size} bytes): {first}"
    return f"not a readable torch weight file ({size} bytes): it is {kind}"


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """torch.load a weight file on CPU (weights_only=True), turning every failure into CheckpointError.

    The error says what the file is instead (an image, a text file, a pickle with other objects...);
    it never suggests loading with weights_only=False.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file does not exist" if not p.exists() else "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(p, "file is empty (0 bytes)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises many types on bad bytes
        raise CheckpointError(p, _load_problem(p, size, exc)) from exc


def strip_module_prefix(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Remove a leading `module.` (DataParallel/DDP) from every key when the first key has it."""
    keys = list(state_dict)
    if keys and keys[0].startswith("module."):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


def identify_checkpoint(obj: Any) -> str:
    """Kind of a loaded weight object: one of the kinds in the module docstring, or "unknown"."""
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return CHECKPOINT_FORMAT
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return "unknown"
    keys = set(strip_module_prefix(obj))
    if "encoder.cls_token" in keys:
        return "cellpose-dino"
    if "encoder.pos_embed" in keys or "W2" in keys:
        return "cellpose-sam"
    if "image_encoder.pos_embed" in keys and "image_encoder.patch_embed.proj.weight" in keys:
        return "sam"
    if any(k.startswith("downsample.down.res_down_0.") for k in keys):
        return "cellpose-classic"
    return "unknown"


def describe(obj: Any) -> str:
    """Short human description of a loaded object, for error messages."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:4]]
        more = f", ... ({len(obj)} entries)" if len(obj) > 4 else ""
        return f"a mapping with keys {keys}{more}"
    return f"an object of type {type(obj).__name__}"


# ----------------------------------------------------------------------------- Cellpose-SAM files


def cpsam_config_from_state_dict(state_dict: StateDict, source: str = "<state_dict>") -> CellposeSAMConfig:
    """Infer the CellposeSAMConfig (width, depth, heads, global blocks, patch, tile) from tensor shapes."""
    try:
        pos = state_dict["encoder.pos_embed"]
        patch = state_dict["encoder.patch_embed.proj.weight"]
        out_w = state_dict["out.weight"]
        neck_w = state_dict["encoder.neck.0.weight"]
    except KeyError as exc:
        raise CheckpointError(source, f"Cellpose-SAM state_dict lacks {exc.args[0]!r}") from None
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.blocks."))
    rows = [int(state_dict[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
    embed_dim = int(pos.shape[-1])
    head_dim = int(state_dict["encoder.blocks.0.attn.rel_pos_h"].shape[1])
    patch_size = int(patch.shape[-1])
    long_rows, short_rows = max(rows), min(rows)
    sam_grid = (long_rows + 1) // 2
    return CellposeSAMConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(i for i, r in enumerate(rows) if r == long_rows),
        sam_img_size=sam_grid * 16,
        sam_patch_size=16,
        sam_window_size=(short_rows + 1) // 2 if short_rows != long_rows else sam_grid,
        patch_size=patch_size,
        tile_size=int(pos.shape[1]) * patch_size,
        out_chans=int(neck_w.shape[0]),
        nout=int(out_w.shape[0]) // patch_size**2,
    )


def _check_w2(w2: torch.Tensor, model: CellposeSAM, source: str) -> None:
    expected = model.W2
    if tuple(w2.shape) != tuple(expected.shape) or not torch.equal(w2.to(expected.dtype), expected.cpu()):
        raise CheckpointError(
            source, f"W2 must be the identity pixel-shuffle kernel of shape {tuple(expected.shape)}"
        )


def cellpose_sam_from_state_dict(
    state_dict: StateDict, source: str = "<state_dict>", attention: str = "sdpa"
) -> CellposeSAM:
    """Build a CellposeSAM matching an official-layout state_dict and load every tensor of it.

    Accepts `module.`-prefixed keys; ignores only the known-unused keys in IGNORABLE_CPSAM_KEYS.
    Raises CheckpointError for a missing `W2`, missing/unexpected/mis-shaped tensors, or another kind.
    """
    sd = strip_module_prefix(state_dict)
    kind = identify_checkpoint(sd)
    if kind == "cellpose-dino":
        raise CheckpointError(source, "a Cellpose-DINO (CPDINO) file; only SAM-based Cellpose-SAM is supported")
    if kind != "cellpose-sam":
        raise CheckpointError(source, f"expected a Cellpose-SAM state_dict, found {_kind_phrase(kind, sd)}")
    if "W2" not in sd:
        raise CheckpointError(source, "no 'W2' tensor: not a Cellpose-SAM (cellpose 4) file")
    config = cpsam_config_from_state_dict(sd, source)
    config.attention = attention
    model = create_model("cpsam", **config.to_dict())
    _check_w2(sd["W2"], model, source)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted) - IGNORABLE_CPSAM_KEYS)
    if missing or unexpected:
        raise CheckpointError(source, _key_mismatch("Cellpose-SAM", missing, unexpected))
    _load_checked(model, {k: sd[k] for k in wanted}, source)
    return model


def _load_checked(model: nn.Module, state_dict: StateDict, source: str) -> None:
    wanted = model.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(wanted[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(wanted[k].shape)
    ]
    if bad:
        raise CheckpointError(source, "tensor shapes differ from the architecture: " + "; ".join(bad[:5]))
    model.load_state_dict(state_dict, strict=True)


def _key_mismatch(what: str, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} {what} tensors missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    return "; ".join(parts)


def _kind_phrase(kind: str, obj: Any) -> str:
    return {
        "sam": "a Segment Anything checkpoint (use load_sam_encoder / cellpose_sam_from_sam to initialise)",
        "cellpose-classic": "a classic Cellpose (CPnet, Cellpose 1-3) state_dict",
        "cellpose-sam": "a Cellpose-SAM state_dict",
        "cellpose-dino": "a Cellpose-DINO state_dict",
        CHECKPOINT_FORMAT: "a cpsam training checkpoint",
    }.get(kind, f"an unrecognised file ({describe(obj)})")


# ----------------------------------------------------------------------------- SAM checkpoints

SAM_VARIANTS = {768: "cpsam_vit_b", 1024: "cpsam_vit_l", 1280: "cpsam_vit_h"}


def sam_encoder_state_dict(obj: Any, source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """The `image_encoder.*` tensors of a SAM checkpoint, prefix removed (SAM's original shapes)."""
    sd = strip_module_prefix(obj) if isinstance(obj, Mapping) else obj
    if identify_checkpoint(sd) != "sam":
        found = _kind_phrase(identify_checkpoint(sd), sd)
        raise CheckpointError(source, f"expected a Segment Anything checkpoint, found {found}")
    return {k.removeprefix("image_encoder."): v for k, v in sd.items() if k.startswith("image_encoder.")}


def load_sam_encoder(model: CellposeSAM, obj: Any, source: str = "<state_dict>") -> list[str]:
    """Initialise `model.encoder` from a SAM checkpoint with the Cellpose-SAM resampling.

    - patch kernel (D, 3, 16, 16) -> taps [::2, ::2] -> (D, 3, 8, 8), not rescaled; the patch bias
      is NOT copied (the reference keeps the freshly initialised bias of its new 8x8 conv);
    - pos_embed (1, 64, 64, D) -> [:, ::2, ::2] -> (1, 32, 32, D);
    - every other encoder tensor (blocks incl. 27/127-row rel-pos tables, neck) copied as is.
    The readout `out` stays randomly initialised. Returns the names of the tensors loaded.
    """
    enc = sam_encoder_state_dict(obj, source)
    cfg = model.config
    sam_patch = enc["patch_embed.proj.weight"]
    sam_depth = len({k.split(".")[1] for k in enc if k.startswith("blocks.")})
    if sam_patch.shape[0] != cfg.embed_dim or sam_depth != cfg.depth:
        raise CheckpointError(
            source,
            f"SAM encoder of width {sam_patch.shape[0]} does not fit a Cellpose-SAM of width {cfg.embed_dim} "
            f"and depth {cfg.depth}",
        )
    step = sam_patch.shape[-1] // cfg.patch_size
    grid = cfg.tile_size // cfg.patch_size
    ds = enc["pos_embed"].shape[1] // grid
    resampled = dict(enc)
    resampled.pop("patch_embed.proj.bias", None)
    resampled["patch_embed.proj.weight"] = sam_patch[:, :, ::step, ::step]
    resampled["pos_embed"] = enc["pos_embed"][:, ::ds, ::ds]
    wanted = model.encoder.state_dict()
    missing = sorted(set(wanted) - set(resampled) - {"patch_embed.proj.bias"})
    unexpected = sorted(set(resampled) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(source, _key_mismatch("SAM image-encoder", missing, unexpected))
    bad = [k for k, v in resampled.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if bad:
        raise CheckpointError(source, f"SAM tensors with unexpected shapes: {bad[:5]}")
    model.encoder.load_state_dict(resampled, strict=False)
    return sorted(resampled)


def cellpose_sam_from_sam(path: str | os.PathLike[str], attention: str = "sdpa") -> CellposeSAM:
    """A Cellpose-SAM network (training initialisation) from a SAM checkpoint file; variant by width."""
    obj = read_checkpoint(path)
    enc = sam_encoder_state_dict(obj, str(path))
    width = int(enc["pos_embed"].shape[-1])
    if width not in SAM_VARIANTS:
        raise CheckpointError(path, f"SAM encoder width {width} is none of ViT-B/L/H ({sorted(SAM_VARIANTS)})")
    model = create_model(SAM_VARIANTS[width], attention=attention)
    load_sam_encoder(model, obj, str(path))
    return model


# ----------------------------------------------------------------------------- our checkpoints


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, **extra: Any) -> Path:
    """Write {"format", "format_version", "model_name", "model_kwargs", "state_dict", **extra} atomically.

    The model must be one of ours (it has `model_name` and `model_kwargs()`).
    Tensors are stored float32 on CPU, whatever the model's dtype/device.
    """
    name = getattr(model, "model_name", None)
    kwargs_fn = getattr(model, "model_kwargs", None)
    if name is None or not callable(kwargs_fn):
        raise ValueError(f"{type(model).__name__} has no model_name/model_kwargs(); not a cpsam model")
    kwargs = kwargs_fn()
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_name": name,
        "model_kwargs": dict(kwargs),
        "state_dict": state,
        **extra,
    }
    return write_torch_file(path, payload)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def write_torch_file(path: str | os.PathLike[str], payload: Any) -> Path:
    """torch.save `payload` to `path` atomically (no partial file is left). torch reports a failed write (a full
    disk) as a RuntimeError of its zip writer: that becomes an OSError naming `path`, ENOSPC when the disk has less
    free space than the payload's tensors need, else EIO, so commands report it as one line like any IO error."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:
            try:
                free = shutil.disk_usage(path.parent).free
            except OSError:
                free = 0
            if free < _tensor_bytes(payload) + (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise OSError(errno.EIO, f"writing failed ({exc})", str(path)) from exc
    return path


def model_from_checkpoint(obj: Mapping[str, Any], source: str = "<checkpoint>") -> nn.Module:
    """Rebuild and load a model from a loaded `save_checkpoint` payload."""
    version = obj.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(source, f"checkpoint format version {version} is not supported (expected 1)")
    try:
        model = create_model(obj["model_name"], **dict(obj["model_kwargs"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"cannot rebuild the model it describes: {exc}") from exc
    sd = obj.get("state_dict")
    if not isinstance(sd, Mapping):
        raise CheckpointError(source, "checkpoint has no state_dict")
    wanted = model.state_dict()
    missing, unexpected = sorted(set(wanted) - set(sd)), sorted(set(sd) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(source, _key_mismatch(obj["model_name"], missing, unexpected))
    _load_checked(model, sd, source)
    record = obj.get("inference")
    if isinstance(record, Mapping):  # what training recorded for inference (cpsam.segment.recorded_inference)
        model.inference_record = dict(record)
    return model


# ----------------------------------------------------------------------------- any file


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", attention: str = "sdpa"
) -> nn.Module:
    """Load any supported weight file and return the right network in eval mode on `device`.

    Official Cellpose-SAM files and our checkpoints give a CellposeSAM (or whatever our checkpoint
    holds); classic Cellpose files give a CPnet. A SAM checkpoint is refused here (it has no
    trained readout): use `cellpose_sam_from_sam` to initialise training from it.
    """
    source = str(path)
    obj = read_checkpoint(path)
    kind = identify_checkpoint(obj)
    if kind == CHECKPOINT_FORMAT:
        model = model_from_checkpoint(obj, source)
    elif kind == "cellpose-sam":
        model = cellpose_sam_from_state_dict(obj, source, attention=attention)
    elif kind == "cellpose-classic":
        try:
            model = cpnet_from_state_dict(strip_module_prefix(obj))
        except ValueError as exc:
            raise CheckpointError(source, f"classic Cellpose file that does not load: {exc}") from exc
    elif kind == "sam":
        raise CheckpointError(
            source,
            "a Segment Anything checkpoint has no trained Cellpose readout; use "
            "cpsam.models.loading.cellpose_sam_from_sam(path) to initialise training from it",
        )
    elif kind == "cellpose-dino":
        raise CheckpointError(source, "a Cellpose-DINO (CPDINO) file; only SAM-based Cellpose-SAM is supported")
    else:
        raise CheckpointError(
            source,
            f"not a recognised weight file: found {describe(obj)}; expected an official Cellpose-SAM file "
            "(cpsam, cpsam_v2), a classic Cellpose file (cyto, cyto3, nuclei, ...) or a cpsam checkpoint",
        )
    if isinstance(model, CellposeSAM) and model.attention_path != attention:
        model.set_attention_path(attention)  # type: ignore[arg-type]
    return model.to(device).eval()
