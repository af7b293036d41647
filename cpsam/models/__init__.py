"""Networks only (no I/O beyond weight files, no training): CP-SAM, CPnet, weight loading,
`resolve_model` (a pretrained name, model file or run folder -> a flow network).

Importing this package registers every architecture with `create_model`.
"""

from cpsam.models import cellpose_sam, cpnet, students, unet  # noqa: F401  (register cpsam_*, cpnet, students, *_unet)
from cpsam.models.cellpose_sam import CellposeSAM, CellposeSAMConfig
from cpsam.models.cpnet import CPnet, cpnet_from_state_dict
from cpsam.models.loading import (
    CheckpointError,
    cellpose_sam_from_sam,
    identify_checkpoint,
    load_model,
    save_checkpoint,
)
from cpsam.models.pretrained import pretrained  # the function shadows the submodule name
from cpsam.models.registry import create_model, list_models, register_model
from cpsam.models.resolve import ModelSpecError, resolve_model

__all__ = [
    "CPnet",
    "CellposeSAM",
    "CellposeSAMConfig",
    "CheckpointError",
    "ModelSpecError",
    "cellpose_sam_from_sam",
    "cpnet_from_state_dict",
    "create_model",
    "identify_checkpoint",
    "list_models",
    "load_model",
    "pretrained",
    "register_model",
    "resolve_model",
    "save_checkpoint",
]
