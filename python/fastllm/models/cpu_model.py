"""A Llama-family GGUF model (or HF quantized checkpoint) for the native CPU executor, loaded
without torch.

    model = load_cpu_model(config, source, "float32", "float16")   # None: the torch path runs it
    weights = model.weights()                        # _C.models.CpuModelWeights: views, no copies
    executor = _C.models.CpuExecutor(weights, ...)   # see worker.cpu_runner
    hidden = model.embed(token_ids)                  # float32 [tokens, hidden] (checks, tools)
    logits = model.logits(hidden[rows])              # float32 [rows, vocab]

It holds the arrays ``quant_loader.load_quantized_model`` gives the torch model (the same raw
rows stacked the same way, the same dequantized norms and biases, the same RoPE table) and runs
the same kernels on them, so both paths compute the same bits. (One difference: an untied
Q8_0/Q4_0/Q4_1 token table stays quantized and is read row by row, which gives the values of the
table the torch model dequantizes whole.) It covers what
``llama.build_cpu_decoder`` runs: every layer's four linears and the output projection in an
encoding the quantized GEMM reads, float32 activations, a float32, float16 or fp8 (e4m3 or e5m2)
KV cache. Any other
model (a tensor without a place, a missing one, a float output projection) gets None, and the
torch path loads it (and reports what is wrong with it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fastllm import _C, kernels
from fastllm.config import ModelConfig
from fastllm.kernels import GGML_QUANT_TYPES, quant_rows_supported, rope_cos_sin_cache
from fastllm.loader import GGUFFile, ModelSource, RawGGUFTensor, dequantize_raw
from fastllm.loader.hf_quant import open_quantized_tensors
from fastllm.models import moe_architectures, native_cpu_architectures
from fastllm.models.moe_weights import MoeParts, MoeSettings, find_moe_parts, stack_moe_rows
from fastllm.models.native_cpu import (
    CACHE_DTYPES,
    Q7_0X8,
    Q8_0,
    Q8_0X8,
    CpuLayer,
    CpuLinear,
    CpuMoe,
    convert_rows,
    lm_head_refine_count,
    native_decoder_enabled,
    prepare_cpu_linear,
    prepare_experts,
)

logger = logging.getLogger(__name__)

# Token tables embed_quant_rows dequantizes row by row (others are dequantized whole).
_EMBED_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@dataclass
class CpuModel:
    config: ModelConfig
    # uint8 rows of a quantized table (embed_type: its type id, a repacked layout's when tied to
    # the output projection) or float32 [vocab, hidden]
    embed_table: np.ndarray
    embed_type: int | None
    # (weight rows, type id); tied: embed_table's rows (a Q8_0 table as Q8_0x8), or a Q7_0x8
    # copy of a Q8_0 table
    lm_head: tuple[np.ndarray, int]
    final_norm: np.ndarray
    rope_cache: np.ndarray
    layers: list[CpuLayer]
    # logits per row recomputed without activation rounding (native_cpu.lm_head_refine_count),
    # from refine_rows: the tied token table beside a 7-bit output projection (its values are
    # the model's), else None (the output projection's rows)
    lm_head_refine: int = 0
    refine_rows: tuple[np.ndarray, int] | None = None

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """float32 [tokens, hidden] embeddings of int32 token ids (a new, writable array)."""
        if self.embed_type is None:
            return self.embed_table[token_ids]
        out = np.empty((len(token_ids), self.config.hidden_size), dtype=np.float32)
        kernels.embed_quant_rows(out, self.embed_table, self.embed_type, token_ids)
        return out

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """float32 [rows, vocab] output projection of contiguous float32 hidden rows."""
        weight, type_id = self.lm_head
        out = np.empty((hidden.shape[0], weight.shape[0]), dtype=np.float32)
        kernels.quant_gemm(out, hidden, weight, type_id, None, True, 0)
        if self.lm_head_refine:
            rows, rows_type = self.refine_rows or self.lm_head
            kernels.refine_top_logits(out, hidden, rows, rows_type, None, self.lm_head_refine)
        return out

    def weights(self) -> _C.models.CpuModelWeights:
        """The arrays as the C++ executor reads them (it keeps references, copies nothing)."""
        c = self.config
        weights = _C.models.CpuModelWeights(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
            intermediate_size=c.intermediate_size, rms_eps=float(c.rms_norm_eps),
            final_norm=self.final_norm, rope_cache=self.rope_cache, rope_neox=True,
            attn_scale=c.head_dim ** -0.5, sliding_window=c.attention_window(),
            embed_table=self.embed_table, embed_type=self.embed_type,
            lm_head=(*self.lm_head, None), lm_head_refine=self.lm_head_refine,
            refine_rows=self.refine_rows)
        for layer in self.layers:
            weights.add_layer(layer.input_norm, layer.post_attention_norm, layer.qkv,
                              layer.o_proj, layer.gate_up, layer.down, **layer.extras())
        return weights


def load_cpu_model(config: ModelConfig, source: ModelSource, dtype: str, kv_dtype: str,
                   kv_scales: list[tuple[float, float]] | None = None) -> CpuModel | None:
    """The model of a GGUF ``source`` (or an HF quantized checkpoint, ``source.quant``) kept
    quantized on the CPU, or None when the native decoder does not cover it (see the module
    docstring) or FASTLLM_CPU_NATIVE_DECODER=0. ``kv_scales``: per-layer (k, v) scales of an
    fp8 cache."""
    if (config.architecture not in native_cpu_architectures() or dtype != "float32"
            or kv_dtype not in CACHE_DTYPES or not native_decoder_enabled()):
        return None
    # As in quant_loader: each tensor's file pages leave the resident set once copied.
    raw, gguf, _ = open_quantized_tensors(source)
    plan = _plan(config, raw)
    if plan is None:
        return None
    embed, head, layers = plan
    refine_rows = None
    if embed.ggml_type in _EMBED_TYPES and config.hidden_size % 32 == 0:
        embed_table, embed_type = _copy(embed, gguf), GGML_QUANT_TYPES[embed.ggml_type]
    else:
        embed_table, embed_type = dequantize_raw(embed), None
    if head is embed and embed_type is not None:
        # One copy of the table serves both, in the layout the GEMM prefers (embed_quant_rows
        # reads it too: a Q8_0x8 copy holds the table's values), unless the output projection's
        # copy changed them (Q7_0x8).
        lm_head = prepare_cpu_linear(embed_table, embed_type, output=True)
        if lm_head[0] is embed_table or lm_head[1] == Q8_0X8:
            embed_table, embed_type = lm_head
        else:
            refine_rows = (embed_table, embed_type)
    else:
        lm_head = prepare_cpu_linear(_copy(head, gguf), GGML_QUANT_TYPES[head.ggml_type],
                                     output=True)
    model = CpuModel(
        config=config, embed_table=embed_table, embed_type=embed_type, lm_head=lm_head,
        lm_head_refine=lm_head_refine_count(lm_head[1]), refine_rows=refine_rows,
        final_norm=dequantize_raw(raw["model.norm.weight"]),
        rope_cache=rope_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling),
        layers=[_layer(config, norms, linears, extra, gguf,
                       kv_scales[i] if kv_scales else (1.0, 1.0))
                for i, (norms, linears, extra) in enumerate(layers)])
    gguf.release_pages()
    logger.info("torch-free CPU model: %d layers, output projection %s (%d logits per row "
                "refined), embedding %s", len(model.layers),
                "Q7_0x8 (7-bit)" if lm_head[1] == Q7_0X8 else head.ggml_type,
                model.lm_head_refine, embed.ggml_type if embed_type is not None else "float32")
    return model


# One linear's checkpoint parts and bias parts (None: no bias).
_LinearPlan = tuple[list[RawGGUFTensor], list[RawGGUFTensor] | None]
# A layer's extras: (MoE parts or None, (q_norm, k_norm) or None)
_LayerExtras = tuple[MoeParts | None, tuple[RawGGUFTensor, RawGGUFTensor] | None]
_LayerPlan = tuple[tuple[RawGGUFTensor, RawGGUFTensor], list[_LinearPlan], _LayerExtras]


def _plan(config: ModelConfig, raw: dict[str, RawGGUFTensor]
          ) -> tuple[RawGGUFTensor, RawGGUFTensor, list[_LayerPlan]] | None:
    """(embedding, output projection, per layer (norms, linears)) when every tensor the model
    needs is there in a form the decoder reads and no other tensor is; None otherwise. Checks
    shapes only: nothing is copied yet."""
    c = config
    hidden, q_size, kv_size = c.hidden_size, c.num_attention_heads * c.head_dim, (
        c.num_key_value_heads * c.head_dim)
    qkv_bias = c.attention_bias or c.architecture == "Qwen2ForCausalLM"
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> RawGGUFTensor | None:
        tensor = raw.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            return None
        used.add(name)
        return tensor

    def linear(prefix: str, parts: list[tuple[str, int]], in_features: int,
               bias: bool) -> _LinearPlan | None:
        weights = [take(f"{prefix}.{name}.weight", (rows, in_features)) for name, rows in parts]
        if any(w is None for w in weights):
            return None
        # Parts of different types are stacked as Q8_0 (_stack).
        if not all(quant_rows_supported(w.ggml_type, in_features) for w in weights):
            return None
        if not bias:
            return weights, None
        biases = [take(f"{prefix}.{name}.bias", (rows,)) for name, rows in parts]
        return None if any(b is None for b in biases) else (weights, biases)

    embed = take("model.embed_tokens.weight", (c.vocab_size, hidden))
    head = raw.get("lm_head.weight")
    if head is not None:
        used.add(head.name)  # tied: the embedding's rows serve as the output projection
    if not c.tie_word_embeddings and head is not None:
        head = take("lm_head.weight", (c.vocab_size, hidden))
    else:
        head = embed
    if (embed is None or head is None or not quant_rows_supported(head.ggml_type, hidden)
            or take("model.norm.weight", (hidden,)) is None):
        return None
    layers: list[_LayerPlan] = []
    moe = MoeSettings.from_config(c) if c.architecture in moe_architectures() else None
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        norms = (take(f"{p}.input_layernorm.weight", (hidden,)),
                 take(f"{p}.post_attention_layernorm.weight", (hidden,)))
        linears = [
            linear(f"{p}.self_attn", [("q_proj", q_size), ("k_proj", kv_size),
                                      ("v_proj", kv_size)], hidden, qkv_bias),
            linear(f"{p}.self_attn", [("o_proj", hidden)], q_size, False),
        ]
        parts = qk = None
        if moe is not None and i in moe.sparse_layers:
            parts = find_moe_parts(raw, f"{p}.mlp", moe.num_experts, moe.intermediate, hidden)
            if parts is None or not stack_moe_rows_supported(parts, hidden, moe.intermediate):
                return None
            used.update(parts.names)
        else:
            linears += [
                linear(f"{p}.mlp", [("gate_proj", c.intermediate_size),
                                    ("up_proj", c.intermediate_size)], hidden, False),
                linear(f"{p}.mlp", [("down_proj", hidden)], c.intermediate_size, False),
            ]
        if moe is not None and moe.qk_norm:
            qk = (take(f"{p}.self_attn.q_norm.weight", (c.head_dim,)),
                  take(f"{p}.self_attn.k_norm.weight", (c.head_dim,)))
            if None in qk:
                return None
        if None in norms or None in linears:
            return None
        layers.append((norms, linears, (parts, qk)))
    if used != raw.keys():
        return None
    return embed, head, layers


def stack_moe_rows_supported(parts: MoeParts, hidden: int, intermediate: int) -> bool:
    """Whether every expert part is in an encoding the quantized GEMM reads (checked before
    anything is copied)."""
    return all(quant_rows_supported(t, intermediate if part == "down" else hidden)
               for part, experts in parts.experts.items() for _, t in experts)


def _layer(config: ModelConfig, norms, linears: list[_LinearPlan], extra: _LayerExtras,
           gguf: GGUFFile, kv_scales: tuple[float, float]) -> CpuLayer:
    parts, qk = extra
    hidden = config.hidden_size
    weights = [_stack(w, bias, gguf) for w, bias in linears]
    moe = None
    if parts is not None:
        c = MoeSettings.from_config(config)
        rows = stack_moe_rows(parts, hidden, c.intermediate)
        for name in parts.gguf_names:
            gguf.release_pages(name)
        gate_up, gate_up_type = prepare_experts(rows.gate_up, rows.gate_up_type,
                                                2 * c.intermediate)
        down, down_type = prepare_experts(rows.down, rows.down_type, hidden)
        moe = CpuMoe((rows.router, rows.router_type, None), gate_up, gate_up_type, down,
                     down_type, c.num_experts, c.top_k, c.intermediate, c.renormalize)
        weights += [None, None]
    return CpuLayer(dequantize_raw(norms[0]), dequantize_raw(norms[1]), *weights, moe=moe,
                    q_norm=None if qk is None else dequantize_raw(qk[0]),
                    k_norm=None if qk is None else dequantize_raw(qk[1]),
                    k_scale=kv_scales[0], v_scale=kv_scales[1])


def _copy(tensor: RawGGUFTensor, gguf: GGUFFile) -> np.ndarray:
    out = np.array(tensor.data)
    gguf.release_pages(tensor.gguf_name)
    return out


def _stack(parts: list[RawGGUFTensor], bias: list[RawGGUFTensor] | None,
           gguf: GGUFFile) -> CpuLinear:
    """One fused linear: its parts' raw rows stacked (Q/K/V, gate/up) and prepared for the
    GEMM, with the parts' biases concatenated in the same order. Parts of different types (a
    Q4_K_M file's Q4_K queries and Q6_K values) are converted to Q8_0 first."""
    types = [GGML_QUANT_TYPES[p.ggml_type] for p in parts]
    if len(set(types)) == 1:
        rows = [p.data for p in parts]
        type_id = types[0]
    else:
        rows = [convert_rows(p.data, t, Q8_0) for p, t in zip(parts, types)]
        type_id = Q8_0
    weight = np.empty((sum(r.shape[0] for r in rows), rows[0].shape[1]), dtype=np.uint8)
    np.concatenate(rows, axis=0, out=weight)
    for p in parts:
        gguf.release_pages(p.gguf_name)
    weight, type_id = prepare_cpu_linear(weight, type_id)
    return weight, type_id, (None if bias is None else
                             np.concatenate([dequantize_raw(b) for b in bias]))
