"""Gemma 2: the token embedding scaled by sqrt(hidden_size), RMSNorms that scale by (1 + w) (the
+1 is folded into the weights at load), a norm before and after both attention and MLP,
GeLU-tanh gated MLP, attention scale query_pre_attn_scalar^-0.5, attention logits capped at
attn_logit_softcapping (inside the paged attention kernels), final logits capped at
final_logit_softcapping, and every other layer (0, 2, ...; ``layer_types``) attending over a
sliding window."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata, PagedAttention
from fastllm.models.layers import KVCache
from fastllm.models.llama import LlamaForCausalLM, RMSNorm
from fastllm.models.parallel import SINGLE
from fastllm.torch_extra import torch

nn = torch.nn

_rotary_embedding = ops.model_op(ops.rotary_embedding)
_gelu_and_mul = ops.model_op(ops.gelu_and_mul)
_softcap = ops.model_op(ops.softcap)


def layer_windows(config: ModelConfig) -> list[int]:
    """Each layer's attention window (-1: none) from ``layer_types`` (HF's default: sliding on
    even layers)."""
    raw = config.raw
    n = config.num_hidden_layers
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    window = int(raw.get("sliding_window") or 4096)
    return [window if t == "sliding_attention" else -1 for t in types]


class Gemma2Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int):
        super().__init__()
        raw = config.raw
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(raw.get("attention_bias", False))
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        scalar = float(raw.get("query_pre_attn_scalar") or self.head_dim)
        softcap = float(raw.get("attn_logit_softcapping") or 0.0)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scalar ** -0.5, window, softcap)

    def forward(self, positions, hidden, kv_cache: KVCache, meta: AttentionMetadata,
                rope_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        _rotary_embedding(positions, q, k, rope_cache, self.head_dim, True)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class Gemma2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        act = config.raw.get("hidden_activation") or config.raw.get("hidden_act")
        if act not in (None, "gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"Gemma 2 with hidden_activation {act!r} is not supported")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gelu_and_mul(self.gate_up_proj(x), "tanh"))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, window: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Gemma2Attention(config, window)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, positions, hidden, kv_cache, meta, rope_cache):
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta, rope_cache)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.embed_scale = config.hidden_size ** 0.5
        self.register_buffer("rope_cache", torch.empty(0), persistent=False)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, w) for w in layer_windows(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        embedded = self.embed_tokens(input_ids)
        # HF rounds the scale to the activations' dtype before multiplying.
        hidden = embedded * torch.tensor(self.embed_scale, dtype=embedded.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv, meta, self.rope_cache)
        return self.norm(hidden)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """The Llama class's weight loading (fused Q/K/V and gate/up), output projection (tied) and
    RoPE table, around Gemma 2's layers; the final logits are soft-capped."""

    _stacked: ClassVar[dict[str, tuple[str, int]]] = LlamaForCausalLM._stacked

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        self.config = config
        self.parallel = SINGLE  # one rank (tensor/pipeline parallelism covers the Llama family)
        self.model = Gemma2Model(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.quant_lm_head: nn.Module | None = None
        self.final_softcap = float(config.raw.get("final_logit_softcapping") or 0.0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap > 0:
            _softcap(logits, self.final_softcap)
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Gemma's RMSNorm scales by (1 + w): the kernel's weight is 1 + w.
        super().load_weights((name, t + 1.0 if name.endswith("norm.weight") else t)
                             for name, t in weights)
