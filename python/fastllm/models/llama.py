"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2): torch for the GEMMs,
fastllm kernels for attention, norms, RoPE and the gated activation.

Q/K/V and gate/up projections are fused into single GEMMs; load_weights maps the checkpoint's
separate tensors into their slices (Phi-3 checkpoints hold them fused already). Qwen3 normalizes
each query and key head (RMSNorm over head_dim) before RoPE; Phi-3's LongRoPE is a rope table
(``kernels.rope_cos_sin_cache``); Qwen2 has Q/K/V biases.

Given a ``ParallelContext`` (fastllm.distributed), the model is one rank's share of a tensor x
pipeline parallel split: its stage's layers, and in them its attention and KV heads, MLP columns
and vocabulary rows (see fastllm.models.parallel); load_weights cuts that share out of the full
checkpoint. Without one (the default) it is the whole model, built of plain torch modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata, PagedAttention
from fastllm.models.native_cpu import CACHE_DTYPES, CpuLayer, CpuLinear, new_cpu_decoder
from fastllm.models.parallel import SINGLE, ParallelContext
from fastllm.models.quant_linear import QuantLinear
from fastllm.models.registry import native_cpu_architectures
from fastllm.torch_extra import torch

nn = torch.nn

KVCache = tuple[torch.Tensor, torch.Tensor]

_rms_norm = ops.model_op(ops.rms_norm)
_fused_add_rms_norm = ops.model_op(ops.fused_add_rms_norm)
_rotary_embedding = ops.model_op(ops.rotary_embedding)
_silu_and_mul = ops.model_op(ops.silu_and_mul)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return _rms_norm(x, self.weight, self.eps)
        _fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual


def _row_parallel_linear(in_features: int, out_features: int, parallel: ParallelContext):
    """The attention output / MLP down projection: this rank's input columns, outputs summed
    across the tensor-parallel ranks (a plain nn.Linear without tensor parallelism)."""
    if parallel.tp_size == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fastllm.models.parallel import RowParallelLinear

    return RowParallelLinear(in_features, out_features, parallel.tp_group)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool = False,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        # This rank's heads: the fused QKV projection is column-parallel (its rows of q, k, v).
        self.num_heads = parallel.shard(config.num_attention_heads, "attention heads")
        self.num_kv_heads = parallel.shard(config.num_key_value_heads, "KV heads")
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = _row_parallel_linear(self.q_size, config.hidden_size, parallel)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   self.head_dim ** -0.5, config.attention_window())
        self.layer_idx = 0  # set by LlamaModel (LoRA tables are per layer)
        # Qwen3: RMSNorm over each query / key head before RoPE.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, rope_cache: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        # Views into qkv: the kernels take rows with a stride, so no copies; RoPE rotates q and k
        # in place inside qkv.
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        lora = meta.lora
        if lora is not None:  # LoRA deltas go into the fused output's slices (targets 0, 1, 2)
            for target, part in enumerate((q, k, v)):
                lora.apply(self.layer_idx, target, hidden, part)
        if self.q_norm is not None:
            n = hidden.shape[0]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(n, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(n, self.kv_size)
        _rotary_embedding(positions, q, k, rope_cache, self.head_dim, True)
        attn = self.attn(q, k, v, kv_cache, meta)
        out = self.o_proj(attn)
        if lora is not None:
            lora.apply(self.layer_idx, 3, attn, out)
        return out


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext = SINGLE):
        super().__init__()
        intermediate = parallel.shard(config.intermediate_size, "the MLP's intermediate size")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.down_proj = _row_parallel_linear(intermediate, config.hidden_size, parallel)
        self.intermediate = intermediate
        self.layer_idx = 0  # set by LlamaModel

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        if lora is None:
            return self.down_proj(_silu_and_mul(self.gate_up_proj(x)))
        gate_up = self.gate_up_proj(x)
        lora.apply(self.layer_idx, 4, x, gate_up[:, :self.intermediate])
        lora.apply(self.layer_idx, 5, x, gate_up[:, self.intermediate:])
        act = _silu_and_mul(gate_up)
        out = self.down_proj(act)
        lora.apply(self.layer_idx, 6, act, out)
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool = False,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm, parallel)
        self.mlp = LlamaMLP(config, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, meta, rope_cache):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, rope_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, meta.lora), residual


def _embedding(config: ModelConfig, parallel: ParallelContext):
    if parallel.tp_size == 1:
        # Given its (uninitialized) weight, nn.Embedding skips its random init: the checkpoint
        # overwrites it anyway, and on the meta device that init imports ~800 torch modules
        # (~70 MB resident) for nothing.
        return nn.Embedding(config.vocab_size, config.hidden_size,
                            _weight=torch.empty(config.vocab_size, config.hidden_size))
    from fastllm.models.parallel import VocabParallelEmbedding

    first, rows = parallel.vocab_rows(config.vocab_size)
    return VocabParallelEmbedding(rows, config.hidden_size, first, parallel.tp_group)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool = False,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        # A pipeline stage holds its own layers; the first embeds the tokens, the last applies
        # the final norm (and, with tied embeddings, needs the embedding as output projection).
        self.embed_tokens = (_embedding(config, parallel) if parallel.is_first_stage or (
            parallel.is_last_stage and config.tie_word_embeddings) else None)
        # Filled by LlamaForCausalLM.init_buffers once the model has real storage.
        self.register_buffer("rope_cache", torch.empty(0), persistent=False)
        self.first_layer, end = parallel.layer_range(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, qk_norm, parallel)
            for _ in range(self.first_layer, end)
        )
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = layer.mlp.layer_idx = i
        self.norm = (RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage
                     else None)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The final hidden states; a pipeline stage before the last takes its predecessor's
        (hidden, residual) as ``intermediate`` (the first stage: None) and returns its own."""
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        for layer, kv in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv, meta, self.rope_cache)
        if self.norm is None:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard index)
    _stacked: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    # checkpoint name fragment -> the dimension tensor parallelism splits (0: output rows of a
    # column-parallel linear, 1: input columns of a row-parallel one); others are replicated.
    _tp_split_dims: ClassVar[dict[str, int]] = {
        "q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0,
        "o_proj": 1, "down_proj": 1,
    }

    def __init__(self, config: ModelConfig, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config = config
        self.parallel = parallel
        rope = config.raw.get("rope_parameters") or {}
        partial = config.raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"{config.architecture} with partial_rotary_factor {partial} is not "
                             "supported")
        qkv_bias = config.attention_bias or config.architecture == "Qwen2ForCausalLM"
        self.model = LlamaModel(config, qkv_bias,
                                qk_norm=config.architecture == "Qwen3ForCausalLM",
                                parallel=parallel)
        if config.tie_word_embeddings or not parallel.is_last_stage:
            self.lm_head = None
        else:
            rows = (config.vocab_size if parallel.tp_size == 1
                    else parallel.vocab_rows(config.vocab_size)[1])
            self.lm_head = nn.Linear(config.hidden_size, rows, bias=False)
        # A QuantLinear over GGUF-encoded rows (see quant_loader); replaces lm_head / the tied
        # embedding as the output projection when set.
        self.quant_lm_head: nn.Module | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def set_quantized_lm_head(self, module: nn.Module) -> None:
        """Use module (hidden -> vocab logits, float32) as the output projection; the float
        lm_head, if any, is dropped and no longer expected from the checkpoint."""
        self.quant_lm_head = module
        self.lm_head = None

    def init_buffers(self, device: torch.device) -> None:
        """Computes the non-persistent buffers (the float32 RoPE cos/sin table) on device. Call
        after construction (models are built on the meta device, then given storage)."""
        c = self.config
        self.model.rope_cache = ops.build_rope_cos_sin_cache(
            c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, device=device)

    def forward(self, input_ids, positions, kv_caches, meta, intermediate=None):
        if intermediate is None:  # the whole model, or the first pipeline stage
            return self.model(input_ids, positions, kv_caches, meta)
        return self.model(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.matmul(hidden, weight.t()).float()
        p = self.parallel
        if p.tp_size == 1:
            return logits
        from fastllm.models.parallel import gather_vocab_logits

        return gather_vocab_logits(logits, self.config.vocab_size, p.tp_size, p.tp_group)

    def cpu_mlp(self, mlp: nn.Module) -> tuple | None:
        """``(gate_up, down, moe)`` of a layer's MLP as ``CpuLayer`` takes them, or None when
        the native decoder cannot run it (a linear not quantized on the CPU)."""
        gate_up, down = _cpu_linear(mlp.gate_up_proj), _cpu_linear(mlp.down_proj)
        return None if gate_up is None or down is None else (gate_up, down, None)

    def _shard_slices(self, fused: str) -> list[tuple[int, int]]:
        # This rank's rows (check_parallel_config made every split whole).
        c, tp = self.config, self.parallel.tp_size
        if fused == "qkv_proj":
            q = c.num_attention_heads * c.head_dim // tp
            kv = c.num_key_value_heads * c.head_dim // tp
            return [(0, q), (q, kv), (q + kv, kv)]
        inter = c.intermediate_size // tp
        return [(0, inter), (inter, inter)]

    def _rank_share(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(name in this model, this rank's part of the tensor) of a full checkpoint tensor, or
        None when it belongs to another pipeline stage."""
        p = self.parallel
        if p.world_size == 1:
            return name, tensor
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            local = int(index) - self.model.first_layer
            if not 0 <= local < len(self.model.layers):
                return None
            name = f"model.layers.{local}.{rest}"
        elif ((name.startswith("model.embed_tokens.") and self.model.embed_tokens is None)
              or (name.startswith("model.norm.") and self.model.norm is None)
              or (name.startswith("lm_head.") and not p.is_last_stage)):
            return None
        if p.tp_size == 1:
            return name, tensor
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            first, rows = p.vocab_rows(self.config.vocab_size)
            part = tensor[first:first + rows]
            if part.shape[0] < rows:  # the padding rows past the vocabulary
                part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
            return name, part
        dim = next((d for part, d in self._tp_split_dims.items() if f".{part}." in name), None)
        if dim is None or (dim == 1 and tensor.dim() == 1):
            return name, tensor  # replicated (norms)
        return name, tensor.chunk(p.tp_size, dim=dim)[p.tp_rank]

    def _dense_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters load_weights fills (a subclass may load others itself)."""
        return dict(self.named_parameters())

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the parameters; every parameter must be set."""
        params = self._dense_parameters()
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            share = self._rank_share(name, tensor)
            if share is None:
                continue  # another pipeline stage's
            name, tensor = share
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the output projection
            target = name
            shard = None
            for part, (fused, idx) in self._stacked.items():
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{fused}.")
                    shard = (fused, idx)
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{self.config.architecture}")
            param = params[target]
            if shard is None:
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                     f"model shape {tuple(param.shape)}")
                param.copy_(tensor)
                loaded.add(target)
            else:
                start, size = self._shard_slices(shard[0])[shard[1]]
                dst = param.narrow(0, start, size)
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                     f"slice shape {tuple(dst.shape)}")
                dst.copy_(tensor)
                loaded.add(f"{target}#{shard[1]}")
        missing = []
        for pname in params:
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in pname), None)
            if fused and pname in loaded:  # a checkpoint with the fused tensor (Phi-3)
                continue
            if fused and pname.endswith(".weight"):
                n = 3 if fused == "qkv_proj" else 2
                missing += [f"{pname}#{i}" for i in range(n) if f"{pname}#{i}" not in loaded]
            elif fused and pname.endswith(".bias"):
                missing += [f"{pname}#{i}" for i in range(3) if f"{pname}#{i}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")


# ---- the native CPU decoder over this model's weights ---------------------------------------------


def _cpu_linear(module) -> CpuLinear | None:
    if not isinstance(module, QuantLinear) or module.qweight.device.type != "cpu":
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous().numpy()
    return module.qweight.numpy(), module.type_id, bias


def build_cpu_decoder(model: nn.Module, kv_caches: Sequence[KVCache], block_size: int):
    """A ``CpuDecoder`` over a torch model's weights and its torch ``kv_caches``, or None when
    the model is not one the native decoder runs (the registry's native architectures) with every
    linear a ``QuantLinear`` on the CPU (then the Python model runs), or is one rank's share of a
    parallel split. Each layer's MLP goes through the model's ``cpu_mlp`` (a subclass's sparse
    MLPs, models.moe)."""
    if (not isinstance(model, LlamaForCausalLM)
            or model.config.architecture not in native_cpu_architectures()
            or model.parallel.world_size > 1):
        return None
    inner = model.model
    caches = cpu_kv_caches(kv_caches)
    if caches is None:
        return None
    if inner.rope_cache.dtype != torch.float32 or inner.norm.weight.dtype != torch.float32:
        return None
    layers = []
    for layer in inner.layers:
        attn = layer.self_attn
        linears = [_cpu_linear(m) for m in (attn.qkv_proj, attn.o_proj)]
        mlp = model.cpu_mlp(layer.mlp)
        if mlp is None or any(spec is None for spec in linears):
            return None
        qk_norms = [None if n is None else n.weight.detach().numpy()
                    for n in (attn.q_norm, attn.k_norm)]
        if any(n is not None and n.dtype != np.float32 for n in qk_norms):
            return None
        layers.append(CpuLayer(layer.input_layernorm.weight.detach().numpy(),
                               layer.post_attention_layernorm.weight.detach().numpy(), *linears,
                               *mlp, q_norm=qk_norms[0], k_norm=qk_norms[1],
                               k_scale=attn.attn.k_scale, v_scale=attn.attn.v_scale))
    return new_cpu_decoder(model.config, inner.norm.weight.detach().numpy(),
                           inner.rope_cache.contiguous().numpy(), layers, caches[0], block_size,
                           caches[1])


def cpu_kv_caches(kv_caches: Sequence[KVCache]) -> tuple[list[tuple], str] | None:
    """The torch KV caches as ``new_cpu_decoder`` takes them (numpy arrays over the same memory;
    an fp8 cache as its uint8 codes, numpy having no float8) and their dtype name, or None
    when they are not CPU caches of a ``CACHE_DTYPES`` dtype."""
    key0 = kv_caches[0][0] if kv_caches else None
    cache_dtype = None if key0 is None else str(key0.dtype).removeprefix("torch.")
    if key0 is None or key0.device.type != "cpu" or cache_dtype not in CACHE_DTYPES:
        return None
    fp8 = key0.element_size() == 1
    arrays = [(k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()) if fp8
              else (k.numpy(), v.numpy()) for k, v in kv_caches]
    return arrays, cache_dtype
