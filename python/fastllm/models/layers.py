"""Pieces the non-Llama models share: LayerNorm over the fastllm kernel, the attention block
of learned-position models (fused Q/K/V with biases, no RoPE), and a loader that copies
checkpoint tensors into parameters of the same name."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata, PagedAttention
from fastllm.torch_extra import torch

nn = torch.nn

KVCache = tuple[torch.Tensor, torch.Tensor]

_layer_norm = ops.model_op(ops.layer_norm)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dimension (elementwise affine, optional bias)."""

    def __init__(self, size: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x, self.weight, self.bias, self.eps)


class BiasedSelfAttention(nn.Module):
    """The attention of OPT and GPT-2 (multi-head, no rotary embedding) over rows of a fused
    Q/K/V projection's output; the models own their projections (named as their checkpoints
    name them)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim,
                                   self.head_dim ** -0.5)

    def attend(self, qkv: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
               ) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.q_size, self.q_size], dim=-1)
        return self.attn(q, k, v, kv_cache, meta)


def copy_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    transform: Callable[[str, torch.Tensor], tuple[str, torch.Tensor] | None]
                    = lambda name, t: (name, t), optional: Iterable[str] = ()) -> None:
    """Copy each checkpoint tensor (after ``transform``: a new name and tensor, or None to skip
    it) into the model's parameter of that name; every parameter not in ``optional`` must be
    set. ValueError naming the tensor on an unknown name or a shape mismatch."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in weights:
            moved = transform(name, tensor)
            if moved is None:
                continue
            target, tensor = moved
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{type(model).__name__}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                                 f"{tuple(param.shape)}")
            param.copy_(tensor)
            loaded.add(target)
    missing = sorted(set(params) - loaded - set(optional))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
