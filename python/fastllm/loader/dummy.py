"""Random weights of the right shapes, for benchmarks and tests that need no real model.

Covers the Llama-family decoder layout (Llama, Mistral, SmolLM2, Qwen2): the parameter set is
derived from the HF config alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastllm.torch_extra import torch

DUMMY_SEED = 0


def expected_parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a Llama-family decoder described by `config`.

    Includes q/k/v biases when `attention_bias` is true or the model is qwen2, and
    `lm_head.weight` only when `tie_word_embeddings` is false.
    """
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    vocab = int(config["vocab_size"])
    qkv_bias = bool(config.get("attention_bias")) or config.get("model_type") == "qwen2"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def iterate_dummy_weights(
    config: dict[str, Any], dtype: torch.dtype, seed: int = DUMMY_SEED
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights: the same `seed` and config give the same tensors.

    Norm weights are 1 + U(-0.01, 0.01) and everything else U(-0.02, 0.02), small enough that
    a forward pass stays finite in half precision.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, shape in expected_parameter_shapes(config).items():
        values = torch.empty(shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            values.uniform_(0.99, 1.01, generator=generator)
        else:
            values.uniform_(-0.02, 0.02, generator=generator)
        yield name, values.to(dtype)
