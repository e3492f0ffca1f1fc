"""Minimal memory-mapped safetensors reader with bf16 support (via ml_dtypes).

The `safetensors` package's numpy backend cannot return bfloat16, and its flax backend loads onto the default
device; reading the (simple) format directly gives zero-copy numpy views of each tensor, so a checkpoint streams
tensor by tensor into sharded device arrays without a second host copy.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import json
import math
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


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's bound


def _read_header(path: str, size: int) -> tuple[int, dict]:
    """(header length N, the header: a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} is over the format's bound of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise SafetensorsError(f"{path}: truncated header (needs {8 + n} bytes, file has {size})")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: corrupt header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (a JSON {type(header).__name__}, not an object)")
    return n, header


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(path: str, name: str, entry, base: int, size: int) -> "TensorInfo":
    """One header entry, checked: its dtype, shape and offsets, and that its bytes lie in the file."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: the entry is a JSON {type(entry).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise SafetensorsError(f"{where}: the entry has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    start, end = base + offsets[0], base + offsets[1]
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != nbytes:
        raise SafetensorsError(f"{where} spans {end - start} bytes, but {dtype}{shape} needs {nbytes}")
    if end > size:
        raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {end}, file has {size} bytes")
    return TensorInfo(name, dtype, tuple(shape), start, end)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """Lazily readable safetensors file: `keys()`, `info(name)`, `get(name)` -> read-only numpy view.

    Opening checks what the format promises before anything is read: a bounded header that is a JSON object of
    tensor entries (dtype, shape, data_offsets); offsets that are non-negative, ordered, non-overlapping and
    contiguous over the whole data section; each tensor's size equal to its dtype × shape. A file breaking any of
    these raises `SafetensorsError`, as the `safetensors` library refuses it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        n, header = _read_header(self.path, size)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise SafetensorsError(f"{self.path}: __metadata__ must be an object of strings")
        self.metadata = metadata or {}
        base = 8 + n
        self._infos = {name: _tensor_info(self.path, name, entry, base, size) for name, entry in header.items()}
        # The data section is the tensors back to back, in offset order: none overlaps another, none is missing.
        position = base
        for info in sorted(self._infos.values(), key=lambda i: (i.start, i.end)):
            if info.start != position:
                raise SafetensorsError(f"{self.path}: tensor {info.name!r} starts at data offset {info.start - base}"
                                       f", not at {position - base} where the tensors before it end (tensors must "
                                       "not overlap or leave gaps)")
            position = info.end
        if position != size:
            raise SafetensorsError(f"{self.path}: the tensors end at data offset {position - base}, but the data "
                                   f"section holds {size - base} bytes")
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
