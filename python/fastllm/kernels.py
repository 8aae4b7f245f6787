"""The native kernels (``fastllm._C.ops``) as Python calls them: the one module that touches
``_C.ops``. It takes numpy arrays or DLPack tensors and imports no torch, so the torch-free CPU path
(``models.cpu_model``, ``models.native_cpu``) and the torch ops (``fastllm.ops``, which register
these kernels with ``torch.library``) reach every kernel through the same names here.

The kernel functions are the binding's own (``_C.pyi`` has their signatures), not wrappers: the
models call some of them per layer per step, where a Python frame more would show.

Also here, because both paths share it: the rotary cos/sin table in numpy. The torch model (through
``ops.build_rope_cos_sin_cache``) and the torch-free path both take it from here, so their tables
are the same bits. (Computed separately they are not: torch's vectorized float64 cos/sin and pow
differ from libm's in the last place, which survives the rounding to float32 in a few entries of
long or scaled tables.)
"""

from __future__ import annotations

import math

import numpy as np

from fastllm import _C

_ops = _C.ops

# ---- kernels ---------------------------------------------------------------------------------------

act_and_mul = _ops.act_and_mul
activation = _ops.activation
attention_cpu_isa = _ops.attention_cpu_isa
copy_blocks = _ops.copy_blocks
embed_quant_rows = _ops.embed_quant_rows
fp8_gemm = _ops.fp8_gemm
fused_add_rms_norm = _ops.fused_add_rms_norm
layer_norm = _ops.layer_norm
lora_apply = _ops.lora_apply
lora_cpu_isa = _ops.lora_cpu_isa
lora_workspace_bytes = _ops.lora_workspace_bytes
moe_experts = _ops.moe_experts
moe_experts_cuda_workspace_bytes = _ops.moe_experts_cuda_workspace_bytes
moe_experts_float = _ops.moe_experts_float
moe_route = _ops.moe_route
paged_attention = _ops.paged_attention
paged_attention_workspace_bytes = _ops.paged_attention_workspace_bytes
quant_convert = _ops.quant_convert
quant_dequantize_rows = _ops.quant_dequantize_rows
quant_gemm = _ops.quant_gemm
quant_gemm_cpu_isa = _ops.quant_gemm_cpu_isa
quant_pack_q7_0x8 = _ops.quant_pack_q7_0x8
quant_pack_q8_0x8 = _ops.quant_pack_q8_0x8
quant_repack = _ops.quant_repack
refine_top_logits = _ops.refine_top_logits
reshape_and_cache = _ops.reshape_and_cache
rms_norm = _ops.rms_norm
rotary_embedding = _ops.rotary_embedding
sample = _ops.sample
SamplingInputs = _ops.SamplingInputs
sampling_workspace_bytes = _ops.sampling_workspace_bytes
softcap = _ops.softcap
swap_blocks = _ops.swap_blocks

# ---- GGUF block encodings --------------------------------------------------------------------------

# ggml type ids of the GGUF block encodings the quantized GEMM reads (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
GGML_QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


def quant_block_info(quant_type: int) -> tuple[int, int]:
    """(values, bytes) per block of a ggml type id; (0, 0) when quant_gemm cannot read it."""
    return tuple(_ops.quant_block_info(quant_type))


def quant_rows_supported(quant_type: str, in_features: int) -> bool:
    """True when the quantized GEMM reads rows of ``in_features`` values in ``quant_type``."""
    type_id = GGML_QUANT_TYPES.get(quant_type)
    if type_id is None:
        return False
    values, _ = quant_block_info(type_id)
    return values > 0 and in_features % values == 0


# ---- rotary cos/sin table --------------------------------------------------------------------------


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                       rope_scaling: dict | None = None) -> np.ndarray:
    """float32 ``[positions, rotary_dim]`` = cat(cos, sin) for the rotary embedding kernel,
    computed in float64.

    ``rope_scaling`` follows the HF config dict: ``{"rope_type" | "type": "linear" | "dynamic" |
    "llama3" | "yarn" | "longrope", "factor": f, ...}``. Dynamic NTK and yarn extend the table to
    ``max_position * factor`` positions (vLLM's convention); yarn folds its magnitude scale into
    cos and sin."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    positions = max_position
    mscale = 1.0
    position_scale = 1.0
    kind = None
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        position_scale = 1.0 / float(rope_scaling["factor"])
    elif kind == "dynamic":
        factor = float(rope_scaling["factor"])
        positions = int(max_position * factor)
        ntk_base = base * ((factor * positions / max_position) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        inv_freq = 1.0 / (ntk_base ** exponents)
    elif kind == "llama3":
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling.get("low_freq_factor", 1.0))
        high = float(rope_scaling.get("high_freq_factor", 4.0))
        old = float(rope_scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen) - low) / (high - low)
        inv_freq = np.where(
            wavelen < old / high, inv_freq,
            np.where(wavelen > old / low, inv_freq / factor,
                     (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    elif kind == "yarn":
        factor = float(rope_scaling["factor"])
        original = int(rope_scaling.get("original_max_position_embeddings", max_position))
        beta_fast = float(rope_scaling.get("beta_fast", 32))
        beta_slow = float(rope_scaling.get("beta_slow", 1))
        low = max(math.floor(_yarn_correction_dim(beta_fast, rotary_dim, base, original)), 0)
        high = min(math.ceil(_yarn_correction_dim(beta_slow, rotary_dim, base, original)),
                   rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attn_factor = float(rope_scaling.get("attention_factor") or 1.0)
        mscale_all_dim = float(rope_scaling.get("mscale_all_dim", 0) or 0)
        mscale_value = float(rope_scaling.get("mscale", 1) or 1)
        mscale = (_yarn_mscale(factor, mscale_value) / _yarn_mscale(factor, mscale_all_dim)
                  if mscale_all_dim else _yarn_mscale(factor)) * attn_factor
        positions = int(original * factor)
    elif kind in ("longrope", "su"):
        # Phi-3's LongRoPE: per-frequency divisors, the short ones up to the pretraining length,
        # the long ones past it (per position, as vLLM; HF switches every position of a
        # sequence to the long factors once it grows past that length).
        original = int(rope_scaling["original_max_position_embeddings"])
        short = np.asarray(rope_scaling["short_factor"], dtype=np.float64)
        long = np.asarray(rope_scaling["long_factor"], dtype=np.float64)
        if short.shape != inv_freq.shape or long.shape != inv_freq.shape:
            raise ValueError(f"longrope factors must have {len(inv_freq)} entries (rotary_dim / 2)")
        factor = float(rope_scaling.get("factor") or max_position / original)
        mscale = float(rope_scaling.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0))
        t = np.arange(max_position, dtype=np.float64)[:, None]
        freqs = np.where(t < original, t * (inv_freq / short), t * (inv_freq / long))
        cache = np.concatenate([np.cos(freqs) * mscale, np.sin(freqs) * mscale], axis=-1)
        return cache.astype(np.float32)
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    freqs = np.outer(np.arange(positions, dtype=np.float64) * position_scale, inv_freq)
    cache = np.concatenate([np.cos(freqs) * mscale, np.sin(freqs) * mscale], axis=-1)
    return cache.astype(np.float32)
