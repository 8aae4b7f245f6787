"""The fastllm ops the model code calls, with a cheap eager path.

Under torch.compile these are the registered ``fastllm::*`` ops. Eagerly, CPU float32/float16
tensors go to the native kernels as numpy views: nanobind reads a numpy array through the buffer
protocol in well under a microsecond, while ``torch.Tensor.__dlpack__`` (the route the generic
wrappers in ``fastllm.ops`` take) costs ~3 us per tensor, and the dispatcher ~8 us per call. A
decode step makes ~10 calls with ~35 tensors per layer, so this is ~3 ms a step on a small model.
Other tensors (CUDA, bfloat16) take the ops' own eager bodies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastllm import _C, ops

_native = _C.ops
_NUMPY_DTYPES = (torch.float32, torch.float16)


def _pick(op) -> Callable:
    body = ops.eager(op)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return body(*args, **kwargs)

    call.__name__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    return call


_fused_add_rms_norm = _pick(ops.fused_add_rms_norm)
_paged_attention = _pick(ops.paged_attention)
_reshape_and_cache = _pick(ops.reshape_and_cache)
_rms_norm = _pick(ops.rms_norm)
_rotary_embedding = _pick(ops.rotary_embedding)
_silu_and_mul = _pick(ops.silu_and_mul)


def _fast(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES
            and not torch.compiler.is_compiling())


def _np(t: torch.Tensor):
    # float8 KV caches cross as uint8, like fastllm.ops._cache.
    return (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _fast(x):
        return _rms_norm(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    _native.rms_norm(out.numpy(), x.numpy(), weight.numpy(), eps, 0)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    if not _fast(x):
        return _fused_add_rms_norm(x, residual, weight, eps)
    _native.fused_add_rms_norm(x.numpy(), residual.numpy(), weight.numpy(), eps, 0)
    return None


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool = True) -> None:
    if not _fast(query):
        return _rotary_embedding(positions, query, key, cos_sin_cache, head_size, is_neox)
    _native.rotary_embedding(positions.numpy(), query.numpy(),
                             None if key is None else key.numpy(), cos_sin_cache.numpy(),
                             head_size, is_neox, 0)
    return None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not _fast(x):
        return _silu_and_mul(x)
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype)
    _native.act_and_mul(out.numpy(), x.numpy(), 0, 0)
    return out


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if not _fast(key):
        return _reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale,
                                  v_scale)
    _native.reshape_and_cache(key.numpy(), value.numpy(), _np(key_cache), _np(value_cache),
                              slot_mapping.numpy(), k_scale, v_scale, 0)
    return None


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, sliding_window: int = -1,
                    softcap: float = 0.0, k_scale: float = 1.0, v_scale: float = 1.0,
                    max_context_len: int = 0) -> torch.Tensor:
    if not _fast(query):
        return _paged_attention(query, key_cache, value_cache, query_start_loc, context_lens,
                                block_tables, scale, sliding_window, softcap, k_scale, v_scale,
                                max_context_len)
    out = torch.empty(query.shape, dtype=query.dtype)
    _native.paged_attention(out.numpy(), query.numpy(), _np(key_cache), _np(value_cache),
                            query_start_loc.numpy(), context_lens.numpy(), block_tables.numpy(),
                            scale, sliding_window, softcap, k_scale, v_scale, max_context_len,
                            None, 0)
    return out
