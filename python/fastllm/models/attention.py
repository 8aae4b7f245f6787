"""Per-step attention inputs shared by every layer, and the paged attention layer itself."""

from __future__ import annotations

from dataclasses import dataclass

from fastllm import ops
from fastllm.torch_extra import torch

_reshape_and_cache = ops.model_op(ops.reshape_and_cache)
_paged_attention = ops.model_op(ops.paged_attention)


@dataclass
class AttentionMetadata:
    """Built once per step from the BatchPlan (the kernels' "plan" half); read by every layer."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    context_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    max_context_len: int
    # The step's LoRA adapters (fastllm.lora.slots.LoraBatch), read by the projections; None
    # when no sequence of the step has one.
    lora: object | None = None


class PagedAttention(torch.nn.Module):
    """Writes this step's K/V into the paged cache, then attends over the cache (the last
    ``sliding_window`` positions when > 0; scores capped at ``softcap * tanh(s / softcap)`` when
    softcap > 0)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int = -1, softcap: float = 0.0):
        super().__init__()
        self.softcap = softcap
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # fp8 KV caches: stored = x / scale (set by the engine; float caches ignore them)
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        n = q.shape[0]
        key_cache, value_cache = kv_cache
        _reshape_and_cache(
            k.view(n, self.num_kv_heads, self.head_dim),
            v.view(n, self.num_kv_heads, self.head_dim),
            key_cache, value_cache, meta.slot_mapping, self.k_scale, self.v_scale,
        )
        out = _paged_attention(
            q.view(n, self.num_heads, self.head_dim), key_cache, value_cache,
            meta.query_start_loc, meta.context_lens, meta.block_tables, self.scale,
            sliding_window=self.sliding_window, softcap=self.softcap,
            max_context_len=meta.max_context_len, k_scale=self.k_scale, v_scale=self.v_scale,
        )
        return out.view(n, self.num_heads * self.head_dim)
