"""The quantized CPU model next to its float twin: how far its distribution is from the float
model's, measured in process (``benchmarks/fidelity.py``, tests/python/test_quantized.py).

    twin = float_linears(model, lm_head=True)          # same weights, float dot products
    ref = sequence_logits(twin, ids, "float32")        # [len(ids), vocab]
    ours = sequence_logits(model, ids, "float16")
    kl = kl_divergence(ref, ours)                      # per token, nats

A float twin holds the model's own weight values (dequantized, as the GGUF loader does) as F32
rows, which the quantized GEMM multiplies with float dot products: switching one linear kind to
F32 turns off the int8 rounding of that kind's activations and nothing else, which is how the
fidelity ablation tells the sources apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from fastllm import kernels
from fastllm.models.cpu_model import CpuModel
from fastllm.models.native_cpu import F32, CpuLinear, new_cpu_decoder

# The linears of a layer, as CpuLayer names them.
LAYER_LINEARS = ("qkv", "o_proj", "gate_up", "down")


def dequantized_rows(weight: np.ndarray, type_id: int, in_features: int) -> np.ndarray:
    """float32 [out_features, in_features]: CPU weight rows of any type or layout dequantized."""
    out = np.empty((weight.shape[0], in_features), dtype=np.float32)
    kernels.quant_dequantize_rows(out, weight, type_id)
    return out


def _float_linear(linear: CpuLinear, in_features: int) -> CpuLinear:
    weight, type_id, bias = linear
    return dequantized_rows(weight, type_id, in_features).view(np.uint8), F32, bias


def float_linears(model: CpuModel, parts: Iterable[str] = LAYER_LINEARS,
                  lm_head: bool = False) -> CpuModel:
    """A copy of ``model`` whose layer linears named in ``parts`` (and the output projection when
    ``lm_head``) are F32 rows of their dequantized weights. The arrays left alone are shared."""
    parts = tuple(parts)
    unknown = set(parts) - set(LAYER_LINEARS)
    if unknown:
        raise ValueError(f"unknown linears {sorted(unknown)}; choose from {LAYER_LINEARS}")
    c = model.config
    widths = {"qkv": c.hidden_size, "o_proj": c.num_attention_heads * c.head_dim,
              "gate_up": c.hidden_size, "down": c.intermediate_size}
    layers = [dataclasses.replace(layer, **{name: _float_linear(getattr(layer, name), widths[name])
                                            for name in parts})
              for layer in model.layers]
    head = model.lm_head
    if lm_head:
        head = (dequantized_rows(head[0], head[1], c.hidden_size).view(np.uint8), F32)
    return dataclasses.replace(model, layers=layers, lm_head=head)


def sequence_logits(model: CpuModel, token_ids: np.ndarray, kv_dtype: str = "float16",
                    rows: slice | np.ndarray | None = None, block_size: int = 8) -> np.ndarray:
    """float32 [rows, vocab] logits of one sequence run in one prefill through the CpuDecoder,
    with a ``kv_dtype`` KV cache, then the model's output projection (refinement included), as
    the CPU executor computes a prompt's logprobs. ``rows`` picks positions (default: all)."""
    ids = np.ascontiguousarray(token_ids, dtype=np.int32)
    c = model.config
    num_blocks = -(-len(ids) // block_size)
    shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
    caches = [(np.zeros(shape, kv_dtype), np.zeros(shape, kv_dtype)) for _ in model.layers]
    decoder = new_cpu_decoder(c, model.final_norm, model.rope_cache, model.layers, caches,
                              block_size)
    hidden = model.embed(ids)
    decoder.forward(hidden, np.arange(len(ids), dtype=np.int32),
                    np.arange(len(ids), dtype=np.int64), np.array([0, len(ids)], np.int32),
                    np.array([len(ids)], np.int32),
                    np.arange(num_blocks, dtype=np.int32)[None], len(ids))
    picked = hidden if rows is None else hidden[rows]
    return model.logits(np.ascontiguousarray(picked))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float logits rows."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row KL(reference || logits) in nats, both given as logits."""
    p_log, q_log = log_softmax(reference), log_softmax(logits)
    return (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
