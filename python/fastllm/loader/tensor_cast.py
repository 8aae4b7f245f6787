"""Casting loaded weights to the model dtype."""

from __future__ import annotations

from fastllm.torch_extra import torch


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point (integer tensors are returned unchanged).

    The cast runs on one thread: it is memory-bound, so a second thread adds little, and on a
    busy machine torch's thread pool waits at a barrier for a descheduled worker (measured here:
    7.6 ms instead of 0.16 ms for a 576x1536 weight). The global thread count is restored
    before returning.
    """
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    threads = torch.get_num_threads()
    if threads == 1:
        return tensor.to(dtype)
    torch.set_num_threads(1)
    try:
        return tensor.to(dtype)
    finally:
        torch.set_num_threads(threads)
