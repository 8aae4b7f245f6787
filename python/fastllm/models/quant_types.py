"""The GGUF block encodings fastllm's quantized GEMM reads (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): their
ggml type ids and block sizes, without torch (the torch-free CPU path checks its weights here)."""

from __future__ import annotations

from fastllm import _C

# ggml type ids of the GGUF block encodings quant_linear reads.
GGML_QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


def quant_block_info(quant_type: int) -> tuple[int, int]:
    """(values, bytes) per block of a ggml type id; (0, 0) when quant_linear cannot read it."""
    return tuple(_C.ops.quant_block_info(quant_type))


def quant_rows_supported(quant_type: str, in_features: int) -> bool:
    """True when the quantized GEMM reads rows of ``in_features`` values in ``quant_type``."""
    type_id = GGML_QUANT_TYPES.get(quant_type)
    if type_id is None:
        return False
    values, _ = quant_block_info(type_id)
    return values > 0 and in_features % values == 0

