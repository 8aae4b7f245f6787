"""Safetensors files read as numpy views, without torch: the quantized HF loader needs the
stored integer and float8 tensors as they are (numpy has no float8, so those come as uint8).

    index = SafetensorsIndex(source.weight_files)
    index.names()                 # every tensor name, in file order
    index.dtype("x.weight")       # "F16", "I32", "F8_E4M3", ...
    index.array("x.weight")       # read-only numpy view of the memory map (BF16 / F8 as uint)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import numpy as np

_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1", "F8_E4M3": "u1", "F8_E5M2": "u1",
    "U32": "<u4", "U16": "<u2",
}


class SafetensorsIndex:
    """Every tensor of one or more safetensors files (shards), memory-mapped on first use."""

    def __init__(self, paths: Sequence[str]):
        self._entries: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for path in paths:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                self._entries[name] = (path, entry["dtype"], tuple(entry["shape"]),
                                       8 + length + start, 8 + length + end)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return self._entries[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def array(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only view (BF16 as uint16, float8 as uint8 codes)."""
        path, dtype, shape, start, end = self._entries[name]
        if dtype not in _NUMPY:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        mm = self._maps.get(path)
        if mm is None:
            mm = self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return mm[start:end].view(_NUMPY[dtype]).reshape(shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor's values as a new float32 array (floating-point dtypes only)."""
        dtype = self.dtype(name)
        raw = self.array(name)
        if dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if dtype == "F8_E4M3":
            return FP8_E4M3_VALUES[raw]
        if dtype in ("F32", "F16", "F64"):
            return raw.astype(np.float32)
        raise ValueError(f"tensor {name} has dtype {dtype}, expected a floating-point one")


def _e4m3_values() -> np.ndarray:
    """float32 value of each OCP e4m3fn byte (bias 7, no infinities, 0x7f / 0xff NaN)."""
    code = np.arange(256)
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6,
                         (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    values = np.where(code & 0x80, -magnitude, magnitude)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


FP8_E4M3_VALUES = _e4m3_values()
