"""A GGUF sparse MLP's tensors as the grouped expert kernel reads them (no torch): both loaders
of quantized MoE models use this, the torch model's (``quant_loader``, into ``QuantSparseMoe``)
and the torch-free one (``cpu_model``, into ``native_cpu.CpuMoe``), so both hold the same bytes.

    parts = find_moe_parts(raw, "model.layers.0.mlp", num_experts, intermediate, hidden)
    rows = stack_moe_rows(parts)    # None: a part in an encoding the GEMM does not read

Experts come stacked (llama.cpp's ``ffn_*_exps``: one [E, rows, cols] tensor per part) or one
tensor per expert (older Mixtral files); either way they become [E * 2I] gate_up rows (per expert
its gate rows, then its up rows) and [E * hidden] down rows. Parts in different encodings are
converted to Q8_0, as fused dense linears are. The router keeps its encoding when the GEMM reads
it, else (F32 in llama.cpp's files, F16, ...) becomes float32 rows (type 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastllm.config import ModelConfig
from fastllm.kernels import GGML_QUANT_TYPES, quant_rows_supported
from fastllm.loader import RawGGUFTensor, dequantize_raw
from fastllm.models.native_cpu import Q8_0, convert_rows

F32 = 0  # ggml's id: float32 rows, read by quant_gemm with float dot products


@dataclass(frozen=True)
class MoeSettings:
    """The mixture-of-experts facts of a config (``ModelConfig.raw``)."""

    num_experts: int
    top_k: int
    intermediate: int  # per expert
    renormalize: bool
    sparse_layers: frozenset[int]
    qk_norm: bool  # Qwen3: RMSNorm over each query and key head before RoPE

    @classmethod
    def from_config(cls, config: ModelConfig) -> MoeSettings:
        raw = config.raw
        experts = raw.get("num_local_experts") or raw.get("num_experts")
        top_k = raw.get("num_experts_per_tok")
        if not experts or not top_k or not 1 <= int(top_k) <= int(experts):
            raise ValueError(f"{config.architecture} config needs num_local_experts (or "
                             f"num_experts) and 1 <= num_experts_per_tok <= it; got {experts} "
                             f"and {top_k}")
        layers = range(config.num_hidden_layers)
        if config.architecture == "Qwen3MoeForCausalLM":
            step = int(raw.get("decoder_sparse_step") or 1)
            dense = set(raw.get("mlp_only_layers") or [])
            sparse = frozenset(i for i in layers if i not in dense and (i + 1) % step == 0)
            return cls(int(experts), int(top_k), int(raw.get("moe_intermediate_size") or
                                                     config.intermediate_size),
                       bool(raw.get("norm_topk_prob", False)), sparse, True)
        return cls(int(experts), int(top_k), config.intermediate_size, True, frozenset(layers),
                   False)


@dataclass
class MoeParts:
    router: RawGGUFTensor
    # per part ("gate", "up", "down"): one (uint8 rows, ggml type name) per expert
    experts: dict[str, list[tuple[np.ndarray, str]]]
    names: set[str]  # the raw tensors used (HF names)
    gguf_names: list[str]


@dataclass
class MoeRows:
    router: np.ndarray
    router_type: int
    gate_up: np.ndarray
    gate_up_type: int
    down: np.ndarray
    down_type: int


def find_moe_parts(raw: dict[str, RawGGUFTensor], prefix: str, num_experts: int,
                   intermediate: int, hidden: int) -> MoeParts | None:
    """The router and experts of the sparse MLP at ``prefix`` (``model.layers.N.mlp``), checked
    for shape; None when some are missing or misshapen."""
    router = raw.get(f"{prefix}.gate.weight")
    if router is None or tuple(router.shape) != (num_experts, hidden):
        return None
    shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden),
              "down": (hidden, intermediate)}
    used = [router]
    experts: dict[str, list[tuple[np.ndarray, str]]] = {}
    for part, shape in shapes.items():
        stacked = raw.get(f"{prefix}.experts.{part}_proj.weight")
        if stacked is not None:
            if tuple(stacked.shape) != (num_experts, *shape):
                return None
            rows = stacked.data.reshape(num_experts, shape[0], -1)
            experts[part] = [(rows[e], stacked.ggml_type) for e in range(num_experts)]
            used.append(stacked)
            continue
        per_expert = [raw.get(f"{prefix}.experts.{e}.{part}_proj.weight")
                      for e in range(num_experts)]
        if any(t is None or tuple(t.shape) != shape for t in per_expert):
            return None
        experts[part] = [(t.data, t.ggml_type) for t in per_expert]
        used += per_expert
    return MoeParts(router, experts, {t.name for t in used}, [t.gguf_name for t in used])


def _stack(parts: list[tuple[np.ndarray, str]], in_features: int) -> tuple[np.ndarray, int] | None:
    """The parts' rows in order as one new array, in their type (Q8_0 when they differ)."""
    types = {t for _, t in parts}
    if not all(quant_rows_supported(t, in_features) for t in types):
        return None
    if len(types) == 1:
        return np.concatenate([rows for rows, _ in parts], axis=0), GGML_QUANT_TYPES[types.pop()]
    return np.concatenate([convert_rows(np.ascontiguousarray(rows), GGML_QUANT_TYPES[t], Q8_0)
                           for rows, t in parts], axis=0), Q8_0


def stack_moe_rows(parts: MoeParts, hidden: int, intermediate: int) -> MoeRows | None:
    """New arrays of the experts' rows (and the router's), or None when an expert part is in an
    encoding the quantized GEMM does not read (then the experts are loaded as floats)."""
    gate, up = parts.experts["gate"], parts.experts["up"]
    gate_up = _stack([p for e in range(len(gate)) for p in (gate[e], up[e])], hidden)
    down = _stack(parts.experts["down"], intermediate)
    if gate_up is None or down is None:
        return None
    router = parts.router
    if quant_rows_supported(router.ggml_type, hidden):
        router_rows, router_type = np.array(router.data), GGML_QUANT_TYPES[router.ggml_type]
    else:
        router_rows = dequantize_raw(router).astype(np.float32).view(np.uint8)
        router_type = F32
    return MoeRows(router_rows, router_type, *gate_up, *down)
