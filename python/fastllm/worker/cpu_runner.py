"""The torch-free executor: a quantized GGUF model on the CPU (``fastllm.models.cpu_model``) run by
the C++ ``_C.models.CpuExecutor`` (cpp/models/include/fastllm/models/cpu_executor.h).

The sibling of ``model_runner.ModelExecutor`` with its native CPU decoder, step for step: the same
embedding, decoder, output projection and sampling kernels on the same inputs, so both give the
same tokens and logprobs. A whole step (block ops, embed, decoder, logits, sampling) runs in C++
without the GIL; Python joins only through the executor's logits hook (guided decoding), for the
steps where a row of a watched request is sampled.
"""

from __future__ import annotations

from fastllm import _C
from fastllm.models.cpu_model import CpuModel

CpuExecutor = _C.models.CpuExecutor


def build_cpu_executor(model: CpuModel, kv_dtype: str, block_size: int, num_blocks: int,
                       num_swap_blocks: int) -> CpuExecutor:
    """The executor over ``model``'s arrays (kept, not copied) with ``num_blocks`` KV blocks (and
    ``num_swap_blocks`` host blocks for swap preemption) of ``kv_dtype`` ("float32"/"float16"),
    allocated lazily: pages become resident as the cache first writes them."""
    return CpuExecutor(model.weights(), block_size=block_size, num_blocks=num_blocks,
                       num_swap_blocks=num_swap_blocks, kv_cache_dtype=kv_dtype)
