"""A small, fast reader for GGUF files (llama.cpp's single-file model format).

Layout (all little-endian)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv     x  key string | value type u32 | value
    n_tensors x  name string | n_dims u32 | dims u64[n_dims] | ggml type u32 | offset u64
    padding to `general.alignment` (default 32)
    tensor data, each tensor at data_start + offset

A string is a u64 byte length followed by UTF-8 bytes. Dims are listed innermost first
(ggml order), so a row-major numpy shape is the reverse.

`gguf.GGUFReader` turns every element of every metadata array into a numpy object and takes
~1.7 s on the default model; this reader parses the header with `struct` and memory-maps the
tensor data, so opening the default model costs tens of milliseconds.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml tensor types this project understands, by their on-disk id.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    8: "Q8_0",
    12: "Q4_K",
    14: "Q6_K",
    30: "BF16",
}

# (elements per block, bytes per block) for each supported type.
GGML_BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}

# Metadata value types: id -> (struct format, numpy dtype) for the fixed-size scalars.
_SCALAR_TYPES: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9
_TYPE_BOOL = 7


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry.

    `shape` is the row-major (numpy/torch) shape, i.e. ggml's dims reversed. `data_offset` is
    absolute in the file. `type_name` is one of `GGML_TYPE_NAMES` values, or "UNKNOWN(<id>)".
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    data_offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> Python value), `tensors` (name -> info) and
    zero-copy `tensor_bytes(name)` views into a read-only memory map.

    Arrays of numbers in metadata are numpy arrays; arrays of strings are lists of str.
    Raises ValueError naming the file when it is not a valid GGUF (bad magic, unsupported
    version, truncated header or tensor data past the end of the file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            raise ValueError(f"cannot open GGUF file {self.path}: {exc}") from exc
        if self._mmap is None:
            raise ValueError(f"GGUF file {self.path} is empty")
        self.file_size = size
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
            raise ValueError(f"GGUF file {self.path} is truncated or corrupt: {exc}") from exc

    # -- parsing -------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._mmap
        assert buf is not None
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF file {self.path} has unsupported version {version}")
        self.version = version
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._read_string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            value, pos = self._read_value(vtype, pos + 4)
            metadata[key] = value
        self.metadata = metadata

        raw_infos = []
        for _ in range(n_tensors):
            name, pos = self._read_string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            raw_infos.append((name, tuple(reversed(dims)), ggml_type, offset))

        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (pos + alignment - 1) // alignment * alignment
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in raw_infos:
            type_name = GGML_TYPE_NAMES.get(ggml_type, f"UNKNOWN({ggml_type})")
            n_elements = 1
            for d in shape:
                n_elements *= d
            n_bytes = 0
            if type_name in GGML_BLOCK_SIZES:
                block, block_bytes = GGML_BLOCK_SIZES[type_name]
                if n_elements % block:
                    raise ValueError(
                        f"GGUF file {self.path}: tensor {name} has {n_elements} elements, "
                        f"not a multiple of the {type_name} block size {block}"
                    )
                n_bytes = n_elements // block * block_bytes
            start = data_start + offset
            if start + n_bytes > self.file_size:
                raise ValueError(
                    f"GGUF file {self.path} is truncated: tensor {name} needs bytes "
                    f"[{start}, {start + n_bytes}) but the file has {self.file_size}"
                )
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, type_name, start, n_bytes)
        self.tensors = tensors
        self.data_start = data_start

    def _read_string(self, pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self._mmap, pos)  # type: ignore[arg-type]
        end = pos + 8 + length
        if end > self.file_size:
            raise IndexError(f"string at {pos} runs past the end of the file")
        return self._mmap[pos + 8 : end].decode("utf-8", errors="replace"), end  # type: ignore[index]

    def _read_value(self, vtype: int, pos: int) -> tuple[Any, int]:
        buf = self._mmap
        if vtype in _SCALAR_TYPES:
            fmt = _SCALAR_TYPES[vtype][0]
            (value,) = struct.unpack_from(fmt, buf, pos)  # type: ignore[arg-type]
            return value, pos + struct.calcsize(fmt)
        if vtype == _TYPE_STRING:
            return self._read_string(pos)
        if vtype == _TYPE_ARRAY:
            elem_type, count = struct.unpack_from("<IQ", buf, pos)  # type: ignore[arg-type]
            pos += 12
            if elem_type == _TYPE_STRING:
                return self._read_string_array(pos, count)
            if elem_type in _SCALAR_TYPES:
                dtype = np.dtype(_SCALAR_TYPES[elem_type][1])
                end = pos + count * dtype.itemsize
                if end > self.file_size:
                    raise IndexError("array runs past the end of the file")
                arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).copy()  # type: ignore[arg-type]
                if elem_type == _TYPE_BOOL:
                    arr = arr.astype(bool)
                return arr, end
            items = []
            for _ in range(count):
                item, pos = self._read_value(elem_type, pos)
                items.append(item)
            return items, pos
        raise ValueError(f"GGUF file {self.path}: unknown metadata value type {vtype}")

    def _read_string_array(self, pos: int, count: int) -> tuple[list[str], int]:
        buf = self._mmap
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        size = self.file_size
        for _ in range(count):
            (length,) = unpack(buf, pos)  # type: ignore[arg-type]
            start = pos + 8
            pos = start + length
            if pos > size:
                raise IndexError("string array runs past the end of the file")
            append(buf[start:pos].decode("utf-8", errors="replace"))  # type: ignore[index]
        return out, pos

    # -- access --------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Read-only uint8 view of one tensor's raw bytes (no copy)."""
        info = self.tensors[name]
        if info.type_name not in GGML_BLOCK_SIZES:
            raise ValueError(
                f"GGUF file {self.path}: tensor {name} has unsupported type {info.type_name}"
            )
        return np.frombuffer(
            self._mmap,  # type: ignore[arg-type]
            dtype=np.uint8,
            count=info.n_bytes,
            offset=info.data_offset,
        )

    def release_pages(self, name: str | None = None) -> None:
        """Drops this process's resident pages of one tensor (or of the whole file) once its
        bytes were copied elsewhere: a read-only file mapping's pages stay in the page cache and
        fault back in if read again, but no longer count in the process's resident set."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            start, end = 0, self.file_size
        else:
            info = self.tensors[name]
            start, end = info.data_offset, info.data_offset + info.n_bytes
        page = mmap.PAGESIZE
        start -= start % page
        self._mmap.madvise(mmap.MADV_DONTNEED, start, min(end, self.file_size) - start)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """A parsed `GGUFFile`, shared between callers while the file is unchanged on disk.

    The loader, config and tokenizer all read the same header; parsing it once saves ~0.1 s.
    Treat the result as read-only.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot open GGUF file {path}: {exc}") from exc
    return _open_cached(path, st.st_size, st.st_mtime_ns)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dictionary of a GGUF file (see `GGUFFile`)."""
    return open_gguf(path).metadata
