"""Networks only (no I/O beyond weight files, no training): CP-SAM, CPnet, weight loading."""

from cpsam.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
