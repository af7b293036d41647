"""Read pickled `.npy` files (cellpose's size models and GUI `_seg.npy` files) without running code.

Cellpose stores dicts with `np.save`, which pickles them; `np.load(allow_pickle=True)` would then
execute whatever a hostile file asks for. `load_npy_dict` unpickles with an allow-list: numpy's
array and scalar rebuilders, dtypes, and plain containers. Anything else is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

# What a cellpose .npy pickle may reference: numpy's array/scalar rebuilders and dtypes, plain containers.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "float"), ("builtins", "int"), ("builtins", "complex"), ("builtins", "bool"),
    ("collections", "OrderedDict"),
}


class UnsafeOrInvalidNpy(ValueError):
    """The file is not a pickled-object .npy of plain data (or asks to run code)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 (pickle API)
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and plain data)")
        return super().find_class(module, name)


def read_npy_object(data: bytes) -> object:
    """The object inside a 0-d object-dtype .npy file (bytes), unpickled with numpy-only globals.

    A plain numeric .npy array is returned as that array. Raises UnsafeOrInvalidNpy otherwise.
    """
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise UnsafeOrInvalidNpy(f"unsupported .npy format version {version}")
        if dtype != np.dtype(object):
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except UnsafeOrInvalidNpy:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError, IndexError) as exc:
        raise UnsafeOrInvalidNpy(str(exc)) from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        return obj.item()
    return obj


def load_npy_dict(path: str | os.PathLike[str]) -> dict:
    """The dict stored in a pickled .npy file (cellpose `np.save(path, dict)`), read safely.

    Raises UnsafeOrInvalidNpy (message naming the file) when it cannot be read, is not a dict, or
    references anything but numpy data; OSError propagates for a missing file.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = read_npy_object(data)
    except UnsafeOrInvalidNpy as exc:
        raise UnsafeOrInvalidNpy(f"{path}: not a readable pickled .npy dict ({exc})") from exc
    if not isinstance(obj, dict):
        raise UnsafeOrInvalidNpy(f"{path}: holds a {type(obj).__name__}, not a dict")
    return obj
