"""GPT-2: learned positions, pre-LayerNorm blocks, GeLU (tanh, "gelu_new"), fused Q/K/V with
biases, no RoPE; the output projection is the token embedding (tied).

HF checkpoints store the four projections as Conv1D weights, ``[in, out]``; this model holds
them as ``nn.Linear`` weights, ``[out, in]``, under the same names, and load_weights transposes.
GGUF files already hold ``[out, in]`` rows (llama.cpp's converter transposes), which the
quantized path reads as they are; the loader hands the float path HF's layout
(``RawGGUFTensor.transposed``)."""

from __future__ import annotations

from collections.abc import Iterable

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata
from fastllm.models.layers import BiasedSelfAttention, KVCache, LayerNorm, copy_checkpoint
from fastllm.models.opt import _activation_name
from fastllm.torch_extra import torch

nn = torch.nn

_activation = ops.model_op(ops.activation)

# Checkpoint names of the Conv1D ([in, out]) weights.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(BiasedSelfAttention):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        raw = config.raw
        if not raw.get("scale_attn_weights", True) or raw.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("GPT-2 without scale_attn_weights, or with "
                             "scale_attn_by_inverse_layer_idx, is not supported")
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.q_size)
        self.c_proj = nn.Linear(self.q_size, config.hidden_size)

    def forward(self, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return self.c_proj(self.attend(self.c_attn(hidden), kv_cache, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation_name(config.raw.get("activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(_activation(self.c_fc(x), self.act))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.hidden_size, eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        eps = float(config.raw.get("layer_norm_epsilon", 1e-5))
        hidden, positions = config.hidden_size, config.max_position_embeddings
        self.wte = nn.Embedding(config.vocab_size, hidden,
                                _weight=torch.empty(config.vocab_size, hidden))
        self.wpe = nn.Embedding(positions, hidden, _weight=torch.empty(positions, hidden))
        self.h = nn.ModuleList(GPT2Block(config, eps) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(hidden, eps)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        # The learned-position add: a row gather and an add.
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block, kv in zip(self.h, kv_caches):
            hidden = block(hidden, kv, meta)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.quant_lm_head: nn.Module | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.transformer.wte = module

    def set_quantized_lm_head(self, module: nn.Module) -> None:
        self.quant_lm_head = module

    def init_buffers(self, device: torch.device) -> None:
        pass  # no RoPE table

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.transformer(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden)
        return torch.matmul(hidden, self.transformer.wte.weight.t()).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def place(name: str, tensor: torch.Tensor):
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                return None  # tied output projection; old checkpoints' causal-mask buffers
            if name.endswith(CONV1D):
                tensor = tensor.t()
            return name, tensor

        copy_checkpoint(self, weights, place)
