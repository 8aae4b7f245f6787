"""Where one worker sits in a tensor x pipeline parallel group, passed explicitly to the model
(no process-global state): its tensor-parallel rank and group, its pipeline stage, and the slices
of the model that follow from them (attention and KV heads, MLP columns, vocabulary rows, layers).

Ranks are laid out stage-major: global rank = pp_rank * tp_size + tp_rank, so a stage's tensor-
parallel ranks are consecutive and the last global rank is the last stage's last tensor rank
(the one whose sampled tokens go back to the engine).

    stage 0: ranks 0 .. tp-1    layers [0, L0)      embedding
    stage 1: ranks tp .. 2tp-1  layers [L0, L1)
    ...
    last:                       layers [.., L)      final norm, output projection, sampling

The tensor-parallel modules (Megatron-style) are at the end. Column-parallel linears (fused QKV,
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

from dataclasses import dataclass
from typing import Any

from fastllm.config import ModelConfig
from fastllm.torch_extra import torch

# Architectures whose torch model (fastllm.models.llama) has tensor- and pipeline-parallel forms.
PARALLEL_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ParallelContext:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    # The torch.distributed process group of this rank's stage (its tensor-parallel peers);
    # None when tp_size is 1.
    tp_group: Any = None

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int:
        """The global rank this one receives activations from (same tensor rank, stage - 1)."""
        return self.rank - self.tp_size

    @property
    def next_stage_rank(self) -> int:
        return self.rank + self.tp_size

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of this stage's decoder layers: as even as possible, earlier stages
        taking one more when the layers do not divide."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return start, start + base + (1 if self.pp_rank < extra else 0)

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows per rank) of this rank's vocabulary slice: the vocabulary padded up
        to a multiple of tp_size, so every rank holds as many rows (the padding rows are zero
        and their logits are cut off after the gather)."""
        per_rank = -(-vocab_size // self.tp_size)
        return self.tp_rank * per_rank, per_rank

    def shard(self, size: int, what: str) -> int:
        """This rank's part of a dimension split evenly across the tensor-parallel ranks."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size "
                             f"{self.tp_size}")
        return size // self.tp_size


SINGLE = ParallelContext()


def check_parallel_config(config: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Raises ValueError naming why the model cannot be split tp_size x pp_size ways."""
    if tp_size == 1 and pp_size == 1:
        return
    if config.architecture not in PARALLEL_ARCHITECTURES:
        raise ValueError(f"tensor/pipeline parallelism supports the Llama family "
                         f"({', '.join(PARALLEL_ARCHITECTURES)}), not {config.architecture}")
    for size, what in ((config.num_attention_heads, "the number of attention heads"),
                       (config.num_key_value_heads, "the number of KV heads"),
                       (config.intermediate_size, "the MLP's intermediate size")):
        if size % tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size "
                             f"{tp_size}")
    if pp_size > config.num_hidden_layers:
        raise ValueError(f"{pp_size} pipeline stages for {config.num_hidden_layers} layers: "
                         "every stage needs at least one layer")


# ---- tensor-parallel modules ---------------------------------------------------------------------



dist = torch.distributed
nn = torch.nn
F = torch.nn.functional


def _pair_peer(group) -> int | None:
    """The other rank's global rank when ``group`` is a gloo pair, else None. Two-rank gloo
    collectives go through one isend/irecv exchange instead: on a 2-vCPU machine gloo's
    all_reduce of a decode-sized tensor took 1.3-1.9 ms (ring phases, each a loopback round
    trip) and all_gather ~0.7 ms, where an exchange took 0.12-0.16 ms."""
    if dist.get_world_size(group) != 2 or dist.get_backend(group) != "gloo":
        return None
    return dist.get_global_rank(group, 1 - dist.get_rank(group))


def _exchange(t: torch.Tensor, peer: int, group) -> torch.Tensor:
    """The peer's tensor of t's shape, for ours (both ranks call this together)."""
    other = torch.empty_like(t)
    requests = [dist.isend(t, peer, group=group), dist.irecv(other, peer, group=group)]
    for request in requests:
        request.wait()
    return other


def tp_all_reduce(t: torch.Tensor, group) -> None:
    """Sums the contiguous t over the tensor-parallel group in place (the same bits on every
    rank: with two, each computes t0 + t1, and float addition commutes)."""
    peer = _pair_peer(group)
    if peer is None:
        dist.all_reduce(t, group=group)
    else:
        t.add_(_exchange(t, peer, group))


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, group):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        tp_all_reduce(out, self.group)
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
        tp_all_reduce(out, self.group)
        return out


def gather_vocab_logits(local: torch.Tensor, vocab_size: int, tp_size: int,
                        group) -> torch.Tensor:
    """[rows, vocab_size] logits from every rank's [rows, padded vocab / tp_size] slice."""
    local = local.contiguous()
    peer = _pair_peer(group)
    if peer is not None:
        other = _exchange(local, peer, group)
        parts = [local, other] if dist.get_rank(group) == 0 else [other, local]
    else:
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1)[:, :vocab_size]
