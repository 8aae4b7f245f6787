"""The fastllm ops the model code calls: the registered op under torch.compile, its plain Python
body otherwise. A decode step makes ~10 op calls per layer, and the dispatcher costs ~8 us each
on a CPU, as much as the kernels of a small model at batch 1."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastllm import ops


def _pick(op) -> Callable:
    body = ops.eager(op)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return body(*args, **kwargs)

    call.__name__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    return call


fused_add_rms_norm = _pick(ops.fused_add_rms_norm)
paged_attention = _pick(ops.paged_attention)
reshape_and_cache = _pick(ops.reshape_and_cache)
rms_norm = _pick(ops.rms_norm)
rotary_embedding = _pick(ops.rotary_embedding)
silu_and_mul = _pick(ops.silu_and_mul)
