"""Minimal memory-mapped safetensors reader with bf16 support (via ml_dtypes).

The `safetensors` package's numpy backend cannot return bfloat16, and its flax backend loads onto the default
device; reading the (simple) format directly gives zero-copy numpy views of each tensor, so a checkpoint streams
tensor by tensor into sharded device arrays without a second host copy.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt or holds an unsupported dtype."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """Lazily readable safetensors file: `keys()`, `info(name)`, `get(name)` -> read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise SafetensorsError(f"{self.path}: truncated header (needs {8 + n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._infos: dict[str, TensorInfo] = {}
        base = 8 + n
        for name, h in header.items():
            start, end = (base + o for o in h["data_offsets"])
            info = TensorInfo(name, h["dtype"], tuple(h["shape"]), start, end)
            if info.dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {info.dtype}")
            nbytes = int(np.prod(info.shape, dtype=np.int64)) * DTYPES[info.dtype].itemsize
            if end - start != nbytes:
                raise SafetensorsError(f"{self.path}: tensor {name!r} spans {end - start} bytes, "
                                       f"but {info.dtype}{list(info.shape)} needs {nbytes}")
            if end > size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {end}, "
                                       f"file has {size} bytes")
            self._infos[name] = info
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> np.ndarray:
        info = self._infos[name]
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(info.shape, dtype=np.int64))
        return np.frombuffer(self._mmap, dtype=DTYPES[info.dtype], count=count,
                             offset=info.start).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drops a tensor's pages from this process's resident memory once it has been copied out.

        The file stays in the OS page cache; streaming a checkpoint then keeps about one tensor mapped, and the
        process's memory holds the model once, not model + file.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self._infos[name]
        start = info.start - info.start % mmap.PAGESIZE
        if info.end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the map closes when it is released
                pass
            self._mmap = None


def save_file(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (any dtype in DTYPES) as one safetensors file, atomically: a reader never sees half a file."""
    names = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype not in names:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in tensors.values():
                f.write(np.ascontiguousarray(arr).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
