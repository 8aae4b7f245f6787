"""Weights of a GGUF file under their HF names: dequantized torch tensors, or raw blocks.

The dequantized values equal what transformers' own GGUF loader produces (same float32
arithmetic, same Q/K row order), so a model loaded here matches an HF reference bit for bit
before any dtype cast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from .gguf_dequant import dequantize
from .gguf_file import GGML_BLOCK_SIZES, GGUFFile, open_gguf
from .gguf_mapping import (
    check_architecture,
    gguf_config,
    hf_tensor_name,
    qk_heads_to_unpermute,
    unpermute_qk_rows,
)
from .tensor_cast import cast_weight


class RawGGUFTensor(NamedTuple):
    """A GGUF tensor kept in its stored encoding.

    `data` is a uint8 array of shape (rows, bytes_per_row) where rows = shape[0] (1 for a 1-D
    tensor); each row is a whole number of `ggml_type` blocks. Rows are in HF order (the llama
    Q/K interleave already undone, which costs a copy for those two tensors); other tensors are
    read-only views of the memory-mapped file.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray
    gguf_name: str = ""  # the tensor's name in the file


def _mapped_tensors(gguf: GGUFFile) -> Iterator[tuple[str, str, int | None]]:
    """(gguf name, hf name, heads to un-interleave or None) for each tensor HF keeps."""
    arch = check_architecture(gguf)
    config = gguf_config(gguf)
    for gguf_name, info in gguf.tensors.items():
        hf_name = hf_tensor_name(gguf_name)
        if hf_name is None:
            continue
        if info.type_name not in GGML_BLOCK_SIZES:
            raise ValueError(
                f"GGUF file {gguf.path}: tensor {gguf_name} has unsupported type "
                f"{info.type_name}; supported: {sorted(GGML_BLOCK_SIZES)}"
            )
        yield gguf_name, hf_name, qk_heads_to_unpermute(arch, gguf_name, config)


def iterate_gguf_weights(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of a GGUF file, dequantized and cast to `dtype`.

    Tensors are new, writable and own their memory (nothing refers to the file afterwards).
    """
    gguf = open_gguf(path)
    for gguf_name, hf_name, heads in _mapped_tensors(gguf):
        info = gguf.tensors[gguf_name]
        values = dequantize(gguf.tensor_bytes(gguf_name), info.type_name, info.n_elements)
        values = values.reshape(info.shape)
        if heads is not None:
            values = unpermute_qk_rows(values, heads)
        yield hf_name, cast_weight(torch.from_numpy(values), dtype)


def iterate_gguf_raw(path: str | os.PathLike[str]) -> Iterator[RawGGUFTensor]:
    """Every weight of a GGUF file under its HF name, still in its ggml encoding.

    For a quantized fast path: `data` can be handed to a kernel that understands `ggml_type`.
    """
    gguf = open_gguf(path)
    for gguf_name, hf_name, heads in _mapped_tensors(gguf):
        info = gguf.tensors[gguf_name]
        rows = info.shape[0] if len(info.shape) > 1 else 1
        data = gguf.tensor_bytes(gguf_name).reshape(rows, -1)
        if heads is not None:
            data = unpermute_qk_rows(data, heads)
        yield RawGGUFTensor(hf_name, info.type_name, info.shape, data, gguf_name)
