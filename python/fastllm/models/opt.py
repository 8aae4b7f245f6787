"""OPT (facebook/opt-*): learned positions (offset 2), LayerNorm, ReLU, no RoPE, biases on every
projection, optional project_in/project_out (word_embed_proj_dim != hidden_size), pre- or
post-LayerNorm (do_layer_norm_before; opt-350m is post). The output projection is the token
embedding (tied)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata
from fastllm.models.layers import BiasedSelfAttention, KVCache, LayerNorm, copy_checkpoint
from fastllm.torch_extra import torch

nn = torch.nn

_activation = ops.model_op(ops.activation)

# OPT's learned position table starts at row 2 (fairseq kept rows 0 and 1 for padding).
POSITION_OFFSET = 2


class OPTAttention(BiasedSelfAttention):
    def __init__(self, config: ModelConfig, bias: bool):
        super().__init__(config)
        hidden = config.hidden_size
        self.qkv_proj = nn.Linear(hidden, 3 * self.q_size, bias=bias)
        self.out_proj = nn.Linear(self.q_size, hidden, bias=bias)

    def forward(self, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return self.out_proj(self.attend(self.qkv_proj(hidden), kv_cache, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.raw
        bias = bool(raw.get("enable_bias", True))
        affine = bool(raw.get("layer_norm_elementwise_affine", True))
        if not affine:
            raise ValueError("OPT without layer_norm_elementwise_affine is not supported")
        self.pre_norm = bool(raw.get("do_layer_norm_before", True))
        self.self_attn = OPTAttention(config, bias)
        self.self_attn_layer_norm = LayerNorm(config.hidden_size, 1e-5, bias=bias)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.final_layer_norm = LayerNorm(config.hidden_size, 1e-5, bias=bias)
        self.act = _activation_name(raw.get("activation_function", "relu"))

    def forward(self, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, kv_cache, meta)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(_activation(self.fc1(hidden), self.act))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


def _activation_name(hf_name: str) -> str:
    names = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
    if hf_name not in names:
        raise ValueError(f"activation_function {hf_name!r} is not supported; supported: "
                         f"{sorted(names)}")
    return names[hf_name]


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.raw
        hidden = config.hidden_size
        embed_dim = int(raw.get("word_embed_proj_dim") or hidden)
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim,
                                         _weight=torch.empty(config.vocab_size, embed_dim))
        positions = config.max_position_embeddings + POSITION_OFFSET
        self.embed_positions = nn.Embedding(positions, hidden,
                                            _weight=torch.empty(positions, hidden))
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if embed_dim != hidden else None
        self.project_out = (nn.Linear(hidden, embed_dim, bias=False) if embed_dim != hidden
                            else None)
        pre_norm = bool(raw.get("do_layer_norm_before", True))
        if pre_norm and not raw.get("_remove_final_layer_norm", False):
            self.final_layer_norm = LayerNorm(hidden, 1e-5,
                                              bias=bool(raw.get("enable_bias", True)))
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        # The learned-position add: a row gather and an add (the table is the model's weight).
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv in zip(self.layers, kv_caches):
            hidden = layer(hidden, kv, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard index)
    _stacked: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        # OPT ties its output projection to the token embedding (HF always does).
        self.quant_lm_head: nn.Module | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.model.decoder.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.decoder.embed_tokens = module

    def set_quantized_lm_head(self, module: nn.Module) -> None:
        self.quant_lm_head = module

    def init_buffers(self, device: torch.device) -> None:
        pass  # no RoPE table

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden)
        return torch.matmul(hidden, self.model.decoder.embed_tokens.weight.t()).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        pending: dict[str, list] = {}

        def place(name: str, tensor: torch.Tensor):
            if name == "lm_head.weight":
                return None  # tied to the token embedding
            for part, (fused, idx) in self._stacked.items():
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{fused}.")
                    if target not in params:
                        break
                    # The three parts fill one parameter: it is copied once all are here.
                    parts = pending.setdefault(target, [None] * 3)
                    parts[idx] = tensor
                    if any(p is None for p in parts):
                        return None
                    del pending[target]
                    return target, torch.cat(parts, dim=0)
            return name, tensor

        copy_checkpoint(self, weights, place)
        if pending:
            raise ValueError(f"checkpoint has only some of the Q/K/V parts of {min(pending)}")
