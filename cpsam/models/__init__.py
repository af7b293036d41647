"""Networks only (no I/O beyond weight files, no training): CP-SAM, CPnet, weight loading."""

from cpsam.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]

from cpsam.models import cpnet  # noqa: E402,F401  (registers "cpnet")
from cpsam.models.cpnet import CPnet, cpnet_from_state_dict  # noqa: E402
from cpsam.models.pretrained import pretrained  # noqa: E402  (the function shadows the submodule name)

__all__ += ["CPnet", "cpnet_from_state_dict", "pretrained"]
