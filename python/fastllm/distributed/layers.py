"""The tensor-parallel pieces of a model (Megatron-style). Column-parallel linears (fused QKV,
gate/up) are plain ``nn.Linear`` over the rank's output rows and need no communication; these are
the parts that do:

- ``RowParallelLinear``: the rank's slice of the input features; the ranks' partial outputs are
  summed by an all-reduce (the attention output and MLP down projections).
- ``VocabParallelEmbedding``: the rank's rows of the vocabulary; tokens outside them embed to
  zero, and an all-reduce adds the one rank's row that holds each token.
- ``gather_vocab_logits``: the output projection's per-rank vocabulary columns, all-gathered so
  every rank of the last stage holds the whole row of logits (and samples the same tokens).
"""

from __future__ import annotations

from fastllm.torch_extra import torch

dist = torch.distributed
nn = torch.nn
F = torch.nn.functional


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, group):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, rows: int, dim: int, first_row: int, group):
        # Given its (uninitialized) weight, nn.Embedding skips its random init (see LlamaModel).
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))
        self.first_row = first_row
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first_row
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.group)
        return out


def gather_vocab_logits(local: torch.Tensor, vocab_size: int, tp_size: int,
                        group) -> torch.Tensor:
    """[rows, vocab_size] logits from every rank's [rows, padded vocab / tp_size] slice."""
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[:, :vocab_size]
