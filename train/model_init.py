"""Build the network a run trains: a registry architecture, optionally initialised from a weight file.

`model.init` accepts what `cpsam segment --model` accepts (official cpsam files, classic Cellpose
files, our checkpoints, pretrained names such as cyto_0), plus a SAM checkpoint (encoder only: the
readout starts random) and a run folder (its model.pt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cpsam.models import create_model
from cpsam.models.cellpose_sam import CellposeSAM
from cpsam.models.loading import identify_checkpoint, load_model, load_sam_encoder, read_checkpoint
from cpsam.models.pretrained import list_pretrained, pretrained
from train.config import ConfigError, ModelConfig


def _architecture_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if cfg.nbase is not None and not cfg.name.startswith("cpsam"):  # CP-SAM has no levels: nbase is not its key
        kwargs["nbase"] = list(cfg.nbase)
    if cfg.layer_drop is not None and cfg.name.startswith("cpsam"):
        kwargs["layer_drop"] = float(cfg.layer_drop)
    if cfg.tile_size is not None and cfg.name.startswith("cpsam"):
        kwargs["tile_size"] = int(cfg.tile_size)
    if cfg.diam_mean is not None and cfg.name.startswith("cpnet"):
        kwargs["diam_mean"] = float(cfg.diam_mean)
    return kwargs


def set_layer_drop(model: nn.Module, rate: float) -> None:
    """Set a CP-SAM model's maximal layer-drop rate (also in its config, so checkpoints record it)."""
    if isinstance(model, CellposeSAM):
        model.layer_drop = float(rate)
        model.config.layer_drop = float(rate)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network of `cfg` in train mode on CPU (float32); raises ConfigError for a bad name or init file."""
    init = cfg.init.strip()
    try:
        if not init:
            model = create_model(cfg.name, **_architecture_kwargs(cfg))
        elif init in list_pretrained():
            model = pretrained(init)
        else:
            path = Path(init)
            if path.is_dir():
                path = path / "model.pt"
            if not path.is_file():
                raise ConfigError(f"model.init {init!r} is neither a file, a run folder nor a pretrained name "
                                  f"({', '.join(list_pretrained())})")
            obj = read_checkpoint(path)
            if identify_checkpoint(obj) == "sam":
                model = create_model(cfg.name, **_architecture_kwargs(cfg))
                if not isinstance(model, CellposeSAM):
                    raise ConfigError(f"model.init {init} is a SAM checkpoint; model.name must be a cpsam_* model")
                load_sam_encoder(model, obj, str(path))
            else:
                del obj
                model = load_model(path)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc
    if cfg.layer_drop is not None:
        set_layer_drop(model, cfg.layer_drop)
    if hasattr(model, "diam_mean"):  # flow models; the binary family has no cell diameter
        if cfg.diam_mean is not None:
            with torch.no_grad():
                model.diam_mean.fill_(float(cfg.diam_mean))
        with torch.no_grad():  # a trained model's own diameter is the one it was trained at
            model.diam_labels.copy_(model.diam_mean)
    return model.float().train()


def enable_activation_checkpointing(model: nn.Module) -> bool:
    """Recompute each ViT block's activations in the backward pass (saves memory, costs ~30 % time).

    Returns False (and changes nothing) for models without transformer blocks.
    """
    if not isinstance(model, CellposeSAM):
        return False
    for block in model.encoder.blocks:
        forward = block.forward

        def checkpointed(x: torch.Tensor, _forward=forward) -> torch.Tensor:
            return checkpoint(_forward, x, use_reentrant=False) if torch.is_grad_enabled() else _forward(x)

        block.forward = checkpointed  # type: ignore[method-assign]
    return True
