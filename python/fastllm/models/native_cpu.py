"""The native CPU decoder: a Llama-family model with GGUF-encoded linears runs its whole layer loop
in one C++ call (``fastllm._C.models.CpuDecoder``) instead of ~30 kernel calls per layer from Python.

    decoder = llama.build_cpu_decoder(model, kv_caches, block_size)  # torch model; None: can't
    decoder = new_cpu_decoder(config, final_norm, rope_cache, layers, kv_caches, block_size)
    hidden = embed(input_ids); decoder.forward(hidden, plan arrays...)

The decoder runs the same kernels in the same order as ``LlamaForCausalLM.forward``, so its hidden
states equal the Python model's. Its caller owns the weights, the embedding and the output
projection: the torch model (``fastllm.models.llama.build_cpu_decoder``). The torch-free path hands the same weights to
the C++ executor (``fastllm.models.cpu_model``, ``_C.models.CpuExecutor``), which runs this
decoder itself. This module does not import torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastllm import _C, kernels
from fastllm.config import ModelConfig

logger = logging.getLogger(__name__)

# KV cache dtypes the decoder reads and writes (float8_e4m3fn / float8_e5m2: uint8 arrays of
# the codes, with per-layer scales).
CACHE_DTYPES = ("float32", "float16", "float8_e4m3fn", "float8_e5m2")

# One linear as CpuDecoder.add_layer takes it: (uint8 weight rows, ggml type id, float32 bias).
CpuLinear = tuple[np.ndarray, int, np.ndarray | None]
KVArrays = tuple[np.ndarray, np.ndarray]

F32, Q4_1, Q8_0, Q4_K, Q6_K = 0, 3, 8, 12, 14  # ggml type ids
# The CPU layouts of Q8_0 output projections (quant_gemm.h): 8-row groups of the rows' own
# values, or of the values requantized to 7 bits (q7_output_enabled).
Q8_0X8, Q7_0X8 = 2008, 1008
# Logits per row recomputed without activation rounding after the output projection, unless
# FASTLLM_CPU_LM_HEAD_REFINE says otherwise: more behind a 7-bit one, whose other logits are
# further off (README "Fidelity" has the measurements behind both counts).
LM_HEAD_REFINE, LM_HEAD_REFINE_Q7 = 32, 128
# What K-quant rows become for the CPU's integer GEMM kernels (prepare_cpu_linear).
KQUANT_TARGETS = {Q4_K: Q4_1, Q6_K: Q8_0}


@dataclass
class CpuMoe:
    """A sparse MLP (``models.moe``): the router, and the experts' stacked uint8 rows (gate_up
    [E * 2 intermediate] rows, per expert its gate rows then its up rows; down [E * hidden])."""

    router: CpuLinear
    gate_up: np.ndarray
    gate_up_type: int
    down: np.ndarray
    down_type: int
    num_experts: int
    top_k: int
    intermediate: int
    renormalize: bool

    def as_tuple(self) -> tuple:
        """The form CpuDecoder.add_layer / CpuModelWeights.add_layer take."""
        return (self.router, self.gate_up, self.gate_up_type, self.down, self.down_type,
                self.intermediate, self.top_k, self.renormalize)


@dataclass
class CpuLayer:
    """One decoder layer's weights: float32 norms, fused linears (Q/K/V and gate/up stacked);
    a sparse layer has ``moe`` instead of gate_up/down; Qwen3 attention has per-head q/k norms."""

    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    qkv: CpuLinear
    o_proj: CpuLinear
    gate_up: CpuLinear | None
    down: CpuLinear | None
    moe: CpuMoe | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    # fp8 KV caches: stored = x / scale (ignored for float caches)
    k_scale: float = 1.0
    v_scale: float = 1.0

    def extras(self) -> dict:
        """add_layer's optional arguments."""
        return {"moe": None if self.moe is None else self.moe.as_tuple(),
                "q_norm": self.q_norm, "k_norm": self.k_norm, "k_scale": self.k_scale,
                "v_scale": self.v_scale}


def native_decoder_enabled() -> bool:
    """FASTLLM_CPU_NATIVE_DECODER=0 keeps the per-op Python layer loop (the torch model)."""
    return os.environ.get("FASTLLM_CPU_NATIVE_DECODER", "1") != "0"


def q7_output_enabled() -> bool:
    """Whether a Q8_0 output projection is requantized to 7 bits (Q7_0x8) rather than kept in
    8 (Q8_0x8). FASTLLM_CPU_Q7_LM_HEAD=1 / 0 decides; unset or "auto", 7 bits only where the
    GEMM runs without VNNI ("avx2"): there the 8-bit one costs ~1.5x the time (~10 % of a decode
    step at 16 clients), with VNNI nothing."""
    value = os.environ.get("FASTLLM_CPU_Q7_LM_HEAD", "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"FASTLLM_CPU_Q7_LM_HEAD must be auto, 0 or 1, got {value!r}")
    if value == "auto":
        return kernels.quant_gemm_cpu_isa() == "avx2"
    return value == "1"


def lm_head_refine_count(type_id: int) -> int:
    """Logits per row that a CPU output projection in layout ``type_id`` recomputes as float dot
    products after its int8 GEMM (``kernels.refine_top_logits``): env
    FASTLLM_CPU_LM_HEAD_REFINE, default LM_HEAD_REFINE (LM_HEAD_REFINE_Q7 for Q7_0x8); 0 turns
    it off."""
    default = LM_HEAD_REFINE_Q7 if type_id == Q7_0X8 else LM_HEAD_REFINE
    value = os.environ.get("FASTLLM_CPU_LM_HEAD_REFINE", str(default))
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"FASTLLM_CPU_LM_HEAD_REFINE must be a count >= 0, got {value!r}")
    return count


def kquant_conversion_enabled() -> bool:
    """FASTLLM_CPU_CONVERT_KQUANTS=0 keeps Q4_K / Q6_K rows (float dot products) on the CPU."""
    return os.environ.get("FASTLLM_CPU_CONVERT_KQUANTS", "1") != "0"


def convert_rows(weight: np.ndarray, type_id: int, target: int) -> np.ndarray:
    """New uint8 rows of ``weight`` (rows of ``type_id``) in ``target`` (Q4_1 from Q4_K, or Q8_0
    from any GGUF type; ``kernels.quant_convert``)."""
    values, nbytes = kernels.quant_block_info(type_id)
    in_features = weight.shape[1] // nbytes * values
    _, target_bytes = kernels.quant_block_info(target)
    out = np.empty((weight.shape[0], in_features // 32 * target_bytes), dtype=np.uint8)
    kernels.quant_convert(out, np.ascontiguousarray(weight), type_id, in_features, target)
    return out


def prepare_cpu_linear(weight: np.ndarray, type_id: int, output: bool = False
                       ) -> tuple[np.ndarray, int]:
    """The (weight rows, type id) the CPU GEMM should read for one linear layer's weight: Q4_0 /
    Q4_1 rows are repacked in place into their 8-row interleaved layout (``kernels.quant_repack``,
    the same bytes; ``QuantLinear.repack_for_cpu`` does the same on the torch path), other types
    are returned as they are. Every linear the torch-free path hands to CpuDecoder or quant_gemm
    passes through here, a tied token table too (embed_quant_rows reads the repacked layout).

    K-quants move onto the integer kernels first (new rows): Q4_K rows become Q4_1 (each 32-value
    sub-block already is one; scales rounded to fp16) and Q6_K rows Q8_0.

    ``output``: the output projection. Q8_0 rows there become a new copy in 8-row groups:
    Q8_0x8 (type 2008, the same values; a tied embedding reads it too) or, where
    q7_output_enabled() (by default: AVX2 without VNNI), Q7_0x8 (type 1008, requantized to 7
    bits, with 7-bit activations: faster there; the caller keeps the Q8_0 rows for a tied
    embedding and the refinement)."""
    if type_id in KQUANT_TARGETS and kquant_conversion_enabled():
        target = KQUANT_TARGETS[type_id]
        weight, type_id = convert_rows(weight, type_id, target), target
    values, nbytes = kernels.quant_block_info(type_id)
    in_features = weight.shape[1] // nbytes * values
    if output and type_id == Q8_0 and weight.shape[0] % 8 == 0:
        packed = np.empty((weight.shape[0], in_features // 32 * 38), dtype=np.uint8)
        if q7_output_enabled():
            kernels.quant_pack_q7_0x8(packed, weight, in_features)
            return packed, Q7_0X8
        kernels.quant_pack_q8_0x8(packed, weight, in_features)
        return packed, Q8_0X8
    return weight, kernels.quant_repack(weight, type_id, in_features)


def prepare_experts(rows: np.ndarray, type_id: int, rows_per_expert: int
                    ) -> tuple[np.ndarray, int]:
    """prepare_cpu_linear for stacked experts: 8-row groups of the x8 layouts must not straddle
    two experts, so Q4_0/Q4_1 rows are repacked only when each expert has whole groups."""
    if rows_per_expert % 8 and type_id not in KQUANT_TARGETS:
        return rows, type_id
    return prepare_cpu_linear(rows, type_id)


def new_cpu_decoder(config: ModelConfig, final_norm: np.ndarray, rope_cache: np.ndarray,
                    layers: Sequence[CpuLayer], kv_caches: Sequence[KVArrays], block_size: int,
                    cache_dtype: str | None = None):
    """A ``CpuDecoder`` over ``layers`` writing into ``kv_caches`` (``[num_blocks, block_size,
    num_kv_heads, head_dim]`` arrays of a ``CACHE_DTYPES`` dtype, one (key, value) pair per
    layer; uint8 arrays for a float8 cache, whose dtype ``cache_dtype`` must then name)."""
    key0 = kv_caches[0][0]
    cache_dtype = cache_dtype or key0.dtype.name
    c = config
    decoder = _C.models.CpuDecoder(
        hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rms_eps=float(c.rms_norm_eps),
        final_norm=final_norm, rope_cache=rope_cache, rope_neox=True,
        attn_scale=c.head_dim ** -0.5, sliding_window=c.attention_window(), block_size=block_size,
        num_blocks=key0.shape[0], cache_dtype=cache_dtype)
    for layer, (k, v) in zip(layers, kv_caches):
        decoder.add_layer(layer.input_norm, layer.post_attention_norm, layer.qkv, layer.o_proj,
                          layer.gate_up, layer.down, k, v, **layer.extras())
    logger.info("native CPU decoder: %d layers, %s KV cache", decoder.num_layers, cache_dtype)
    return decoder
