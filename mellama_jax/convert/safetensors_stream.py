"""Writing safetensors files one tensor at a time: the header is known from shapes alone, so no shard is
ever held in memory whole. Format: 8-byte little-endian header size, JSON header, raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mellama_jax.dtypes import np_dtype

DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32", "int64": "I64"}


def write_streaming(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], str]],
    fetch: Callable[[str], np.ndarray],
    metadata: dict | None = None,
) -> int:
    """Write `tensors` (name, shape, dtype name) into one file, pulling each array from `fetch(name)`."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype(dtype)).itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in tensors:
            array = np.asarray(fetch(name))
            array = np.ascontiguousarray(array.astype(np_dtype(dtype), copy=False))
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} has shape {array.shape}, expected {tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset
