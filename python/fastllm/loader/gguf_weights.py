"""Weights of a GGUF file under their HF names as dequantized torch tensors (raw blocks: see
`gguf_raw`).

The dequantized values equal what transformers' own GGUF loader produces (same float32
arithmetic, same Q/K row order), so a model loaded here matches an HF reference bit for bit
before any dtype cast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from fastllm.torch_extra import torch

from .gguf_dequant import dequantize
from .gguf_file import open_gguf
from .gguf_mapping import unpermute_qk_rows
from .gguf_raw import hf_values, mapped_tensors
from .tensor_cast import cast_weight


def iterate_gguf_weights(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of a GGUF file, dequantized and cast to `dtype`.

    Tensors are new, writable and own their memory (nothing refers to the file afterwards).
    """
    gguf = open_gguf(path)
    for gguf_name, place in mapped_tensors(gguf):
        info = gguf.tensors[gguf_name]
        values = dequantize(gguf.tensor_bytes(gguf_name), info.type_name, info.n_elements)
        values = values.reshape(info.shape)
        if place.unpermute_heads is not None:
            values = unpermute_qk_rows(values, place.unpermute_heads)
        values = hf_values(values, place.transposed, place.value_offset)
        yield place.hf_name, cast_weight(torch.from_numpy(values), dtype)
