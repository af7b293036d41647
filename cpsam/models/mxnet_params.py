"""Read MXNet `.params` files (a list of named NDArrays) into numpy arrays, without mxnet.

Binary layout (little-endian), as written by MXNet's `NDArray::Save(stream, data, names)`
(`mx.nd.save`, Gluon `save_parameters`):

```
uint64 0x112 (list magic)   uint64 0 (reserved)
uint64 n_arrays, then n_arrays NDArray records
uint64 n_names,  then n_names x (uint64 length, UTF-8 bytes)   # 0 names = unnamed list
```

One dense NDArray record, in one of three historical versions:

```
V2:     uint32 0xF993FAC9, int32 storage type (0 = dense), shape, context, int32 dtype, data
V1:     uint32 0xF993FAC8,                                 shape, context, int32 dtype, data
legacy: uint32 ndim, uint32 dims[ndim],                           context, int32 dtype, data
shape (V1/V2) = uint32 ndim, int64 dims[ndim];  ndim 0 means an empty record (nothing follows)
context = int32 device type, int32 device id;  data = prod(dims) elements, C order
```

Sparse records (storage type != 0) and the numpy-shape V3 records of MXNet >= 1.6 are refused
with a clear error: classic Cellpose files never contain them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

# mshadow type flags -> little-endian numpy dtypes.
MXNET_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
_MAX_LEGACY_NDIM = 32  # a legacy record starts with its ndim; anything larger is not a record


class MXNetParamsError(ValueError):
    """A byte string that is not a (supported) MXNet NDArray list; the message says where and why."""


class _Cursor:
    """Sequential little-endian reader over a bytes buffer that fails with the offset on truncation."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.source = source

    def error(self, problem: str) -> MXNetParamsError:
        where = f"{self.source}: not a readable MXNet .params file"
        return MXNetParamsError(f"{where}: {problem} (byte {self.pos})")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"truncated: needs {n} more bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]


def _read_shape(cur: _Cursor, magic: int) -> tuple[int, ...]:
    """Shape of one record; `magic` is the record's first uint32 (the ndim itself for legacy)."""
    if magic == NDARRAY_V1_MAGIC or magic == NDARRAY_V2_MAGIC:
        ndim = cur.u32()
        if ndim > _MAX_LEGACY_NDIM:
            raise cur.error(f"implausible ndim {ndim}")
        return cur.unpack(f"{ndim}q") if ndim else ()
    return cur.unpack(f"{magic}I") if magic else ()  # legacy: magic is ndim, uint32 dims


def _read_ndarray(cur: _Cursor, index: int) -> np.ndarray | None:
    """One NDArray record as a numpy array (a copy), or None for an empty (ndim 0) record."""
    magic = cur.u32()
    if magic == NDARRAY_V3_MAGIC:
        raise cur.error(f"array {index} uses the numpy-shape V3 record of MXNet >= 1.6 (not supported)")
    if magic not in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC) and magic > _MAX_LEGACY_NDIM:
        raise cur.error(f"array {index} starts with unknown magic 0x{magic:08X}")
    if magic == NDARRAY_V2_MAGIC:
        (stype,) = cur.unpack("i")
        if stype != 0:
            raise cur.error(f"array {index} has sparse storage type {stype} (only dense is supported)")
    shape = _read_shape(cur, magic)
    if len(shape) == 0:
        return None
    if any(d < 0 for d in shape):
        raise cur.error(f"array {index} has negative dimension in shape {shape}")
    cur.unpack("ii")  # context (device type, device id): the data is always stored as on the CPU
    (type_flag,) = cur.unpack("i")
    if type_flag not in MXNET_DTYPES:
        raise cur.error(f"array {index} has unknown dtype flag {type_flag}")
    dtype = MXNET_DTYPES[type_flag]
    count = int(np.prod(shape, dtype=np.int64))
    raw = cur.take(count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()


def parse_mxnet_params(data: bytes, source: str = "<bytes>") -> dict[str, np.ndarray]:
    """Parse the bytes of an MXNet NDArray list into `{name: array}` in file order.

    Arrays keep their stored dtype (float32 for Cellpose weights) and shape, in C order. An unnamed
    list gets names "0", "1", ...; empty (ndim 0) records are dropped. `source` names the input in
    error messages. Raises MXNetParamsError on anything malformed, truncated or with trailing bytes.
    """
    cur = _Cursor(bytes(data), source)
    if len(cur.data) < 16:
        raise cur.error(f"only {len(cur.data)} bytes, shorter than the 16-byte header")
    magic, _reserved = cur.unpack("QQ")
    if magic != LIST_MAGIC:
        raise MXNetParamsError(
            f"{source}: not an MXNet .params file: header magic 0x{magic:X}, expected 0x{LIST_MAGIC:X}"
        )
    n_arrays = cur.u64()
    if n_arrays > len(cur.data):  # every record takes at least one byte
        raise cur.error(f"implausible array count {n_arrays}")
    arrays = [_read_ndarray(cur, i) for i in range(n_arrays)]
    n_names = cur.u64()
    if n_names not in (0, n_arrays):
        raise cur.error(f"{n_names} names for {n_arrays} arrays")
    names = []
    for i in range(n_names):
        length = cur.u64()
        try:
            names.append(bytes(cur.take(length)).decode("utf-8"))
        except UnicodeDecodeError:
            raise cur.error(f"name {i} is not UTF-8") from None
    if cur.pos != len(cur.data):
        raise cur.error(f"{len(cur.data) - cur.pos} unexpected trailing bytes")
    if not names:
        names = [str(i) for i in range(n_arrays)]
    if len(set(names)) != len(names):
        raise cur.error("duplicate array names")
    return {name: arr for name, arr in zip(names, arrays, strict=True) if arr is not None}


def read_mxnet_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an MXNet `.params` file into `{name: numpy array}` (file order, stored dtypes and shapes).

    Raises FileNotFoundError for a missing file and MXNetParamsError naming the file otherwise.
    """
    p = Path(path)
    return parse_mxnet_params(p.read_bytes(), source=str(p))
