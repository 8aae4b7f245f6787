"""The native CPU decoder: a Llama-family model with GGUF-encoded linears runs its whole layer loop
in one C++ call (``fastllm._C.ops.CpuDecoder``) instead of ~30 kernel calls per layer from Python.

    decoder = build_cpu_decoder(model, kv_caches, block_size)   # None when the model can't
    hidden = embed(input_ids); decoder.forward(hidden.numpy(), plan arrays...)

The decoder runs the same kernels in the same order as ``LlamaForCausalLM.forward``, so its hidden
states equal the Python model's; the model object still owns the weights, the embedding and the
output projection.
"""

from __future__ import annotations

import logging

import torch

from fastllm import _C
from fastllm.models.llama import LlamaForCausalLM
from fastllm.models.quant_linear import QuantLinear

logger = logging.getLogger(__name__)

_CACHE_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def _linear(module) -> tuple | None:
    if not isinstance(module, QuantLinear) or module.qweight.device.type != "cpu":
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous().numpy()
    return module.qweight.numpy(), module.type_id, bias


def build_cpu_decoder(model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      block_size: int):
    """A ``CpuDecoder`` over ``model``'s weights and ``kv_caches``, or None when the model is not
    a Llama-family model whose four linears per layer are all ``QuantLinear`` on the CPU (then the
    Python model runs)."""
    if type(model) is not LlamaForCausalLM:
        return None
    inner = model.model
    key0 = kv_caches[0][0] if kv_caches else None
    if key0 is None or key0.device.type != "cpu" or key0.dtype not in _CACHE_DTYPES:
        return None
    if inner.rope_cache.dtype != torch.float32 or inner.norm.weight.dtype != torch.float32:
        return None
    specs = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                         mlp.down_proj)]
        if any(spec is None for spec in linears):
            return None
        specs.append((layer, linears))
    c = model.config
    first = inner.layers[0]
    decoder = _C.ops.CpuDecoder(
        hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rms_eps=float(first.input_layernorm.eps),
        final_norm=inner.norm.weight.detach().numpy(),
        rope_cache=inner.rope_cache.contiguous().numpy(),
        rope_neox=True, attn_scale=float(first.self_attn.attn.scale),
        sliding_window=int(first.self_attn.attn.sliding_window), block_size=block_size,
        num_blocks=key0.shape[0], cache_dtype=_CACHE_DTYPES[key0.dtype])
    for (layer, (qkv, o, gate_up, down)), (k, v) in zip(specs, kv_caches):
        decoder.add_layer(layer.input_layernorm.weight.detach().numpy(),
                          layer.post_attention_layernorm.weight.detach().numpy(), qkv, o, gate_up,
                          down, k.numpy(), v.numpy())
    logger.info("native CPU decoder: %d layers, %s KV cache", decoder.num_layers,
                _CACHE_DTYPES[key0.dtype])
    return decoder
