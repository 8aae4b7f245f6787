"""A GGUF file's weights under their HF names, still in their ggml block encoding (no torch).

    for t in iterate_gguf_raw(path):      # RawGGUFTensor(name, ggml_type, shape, data, ...)
        kernel_input = t.data             # uint8 (rows, bytes_per_row), HF row order
        values = dequantize_raw(t)        # float32 of t.shape
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from .gguf_dequant import dequantize
from .gguf_file import GGML_BLOCK_SIZES, GGUFFile, open_gguf
from .gguf_mapping import (
    TensorPlacement,
    gguf_config,
    gguf_layout,
    tensor_placement,
    unpermute_qk_rows,
)


class RawGGUFTensor(NamedTuple):
    """A GGUF tensor kept in its stored encoding.

    `data` is a uint8 array of shape (rows, bytes_per_row) where rows = shape[0] (1 for a 1-D
    tensor); each row is a whole number of `ggml_type` blocks. Rows are in HF order (the llama
    Q/K interleave already undone, which costs a copy for those two tensors); other tensors are
    read-only views of the memory-mapped file. `shape` is the stored (GGUF, row-major) shape.

    `transposed`: the HF tensor is the transpose of the stored one (GPT-2's Conv1D weights; the
    stored `[out, in]` rows are what a linear layer's GEMM reads). `value_offset`: subtract it
    from the stored values to get the HF ones (Gemma's norms). `dequantize_raw` applies both.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray
    gguf_name: str = ""  # the tensor's name in the file
    transposed: bool = False
    value_offset: float = 0.0


def mapped_tensors(gguf: GGUFFile) -> Iterator[tuple[str, TensorPlacement]]:
    """(gguf name, where it goes) for each tensor HF keeps."""
    layout = gguf_layout(gguf)
    config = gguf_config(gguf)
    for gguf_name, info in gguf.tensors.items():
        placement = tensor_placement(gguf_name, layout, config)
        if placement is None:
            continue
        if info.type_name not in GGML_BLOCK_SIZES:
            raise ValueError(
                f"GGUF file {gguf.path}: tensor {gguf_name} has unsupported type "
                f"{info.type_name}; supported: {sorted(GGML_BLOCK_SIZES)}"
            )
        yield gguf_name, placement


def iterate_gguf_raw(path: str | os.PathLike[str]) -> Iterator[RawGGUFTensor]:
    """Every weight of a GGUF file under its HF name, still in its ggml encoding.

    For a quantized fast path: `data` can be handed to a kernel that understands `ggml_type`.
    """
    gguf = open_gguf(path)
    for gguf_name, place in mapped_tensors(gguf):
        info = gguf.tensors[gguf_name]
        rows = info.shape[0] if len(info.shape) > 1 else 1
        data = gguf.tensor_bytes(gguf_name).reshape(rows, -1)
        if place.unpermute_heads is not None:
            data = unpermute_qk_rows(data, place.unpermute_heads)
        yield RawGGUFTensor(place.hf_name, info.type_name, info.shape, data, gguf_name,
                            place.transposed, place.value_offset)


def dequantize_raw(raw: RawGGUFTensor) -> np.ndarray:
    """The tensor's HF values as a new float32 array (of its shape, or the transpose's)."""
    n = int(np.prod(raw.shape))
    values = dequantize(np.ascontiguousarray(raw.data).reshape(-1), raw.ggml_type, n).reshape(
        raw.shape)
    return hf_values(values, raw.transposed, raw.value_offset)


def hf_values(values: np.ndarray, transposed: bool, value_offset: float) -> np.ndarray:
    """Stored GGUF values -> the HF tensor's (see RawGGUFTensor)."""
    if value_offset:
        values = values - np.float32(value_offset)
    return np.ascontiguousarray(values.T) if transposed else values
