"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE. Attention, norms and embeddings are the
Llama family's (``models.llama``); the MLP of a sparse layer is a router and a stack of experts:

    logits = x W_router^T                    [tokens, experts]
    weights, ids = top_k(softmax(logits))    divided by their sum (Mixtral; Qwen3-MoE when
                                             norm_topk_prob)
    y[t] = sum_j weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]),  e = ids[t, j]

Qwen3-MoE adds a per-head RMSNorm on queries and keys before RoPE, and may keep some layers dense
(``mlp_only_layers``, ``decoder_sparse_step``).

Experts are stored stacked, as transformers 5 holds them: ``experts.gate_up_proj`` [E, 2I, hidden]
(gate rows, then up rows) and ``experts.down_proj`` [E, hidden, I]. ``load_weights`` takes the
checkpoints' per-expert tensors (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj), the stacked 3-D
ones, and the GGUF loader's names for llama.cpp's stacked ``ffn_*_exps``.

On the CPU with a quantized GGUF, ``quant_loader`` replaces each ``SparseMoe`` by a
``QuantSparseMoe`` (experts kept in their GGUF encoding, run by the grouped kernel
``kernels.moe_experts``), and the native decoder runs the whole model (``build_cpu_decoder``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from fastllm import kernels
from fastllm.config import ModelConfig
from fastllm.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
)
from fastllm.models.moe_weights import MoeSettings
from fastllm.models.native_cpu import (
    CpuMoe,
    prepare_experts,
)
from fastllm.torch_extra import torch

nn = torch.nn




def route(logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32, ids int64) [tokens, top_k]: HF transformers' routing arithmetic."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """The stacked expert MLPs, run grouped by expert with torch GEMMs (any device, dtype)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate),
                                      requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // top_k
        xs = x[tokens]
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = xs[start:start + count]
            gate, up = (rows @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            ys[start:start + count] = (nn.functional.silu(gate) * up) @ self.down_proj[e].t()
            start += count
        scaled = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, scaled)


class SparseMoe(nn.Module):
    def __init__(self, config: ModelConfig, s: MoeSettings):
        super().__init__()
        self.top_k = s.top_k
        self.renormalize = s.renormalize
        self.gate = nn.Linear(config.hidden_size, s.num_experts, bias=False)  # the router
        self.experts = Experts(s.num_experts, config.hidden_size, s.intermediate)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, ids, weights)


class QuantSparseMoe(nn.Module):
    """A ``SparseMoe`` over GGUF-encoded rows on the CPU: the router's GEMM, ``moe_route`` and the
    grouped ``moe_experts`` kernel, the calls the native decoder makes (so both give the same
    bits). ``router``: uint8 [E, row bytes] of ``router_type`` (0: float32 rows);
    ``gate_up``: [E * 2I, row bytes] (per expert its gate rows, then its up rows); ``down``:
    [E * hidden, row bytes]."""

    def __init__(self, s: MoeSettings, router: torch.Tensor, router_type: int,
                 gate_up: torch.Tensor, gate_up_type: int, down: torch.Tensor, down_type: int):
        super().__init__()
        self.num_experts = s.num_experts
        self.top_k = s.top_k
        self.intermediate = s.intermediate
        self.renormalize = s.renormalize
        self.router_type = router_type
        self.gate_up_type = gate_up_type
        self.down_type = down_type
        self.register_buffer("router", router)
        self.register_buffer("gate_up", gate_up)
        self.register_buffer("down", down)

    def repack_for_cpu(self) -> None:
        """Experts in the layout the CPU GEMM reads fastest (native_cpu.prepare_experts)."""
        hidden = self.down.shape[0] // self.num_experts
        gate_up, self.gate_up_type = prepare_experts(self.gate_up.numpy(), self.gate_up_type,
                                                     2 * self.intermediate)
        down, self.down_type = prepare_experts(self.down.numpy(), self.down_type, hidden)
        if gate_up.shape != self.gate_up.shape:
            self.gate_up = torch.from_numpy(gate_up)
        if down.shape != self.down.shape:
            self.down = torch.from_numpy(down)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float().contiguous()
        n = x.shape[0]
        logits = np.empty((n, self.num_experts), np.float32)
        xn = x.numpy()
        kernels.quant_gemm(logits, xn, self.router.numpy(), self.router_type, None, True, 0)
        ids = np.empty((n, self.top_k), np.int32)
        weights = np.empty((n, self.top_k), np.float32)
        kernels.moe_route(logits, self.top_k, self.renormalize, ids, weights)
        out = torch.empty_like(x)
        kernels.moe_experts(out.numpy(), xn, ids, weights, self.gate_up.numpy(),
                            self.gate_up_type, self.down.numpy(), self.down_type,
                            self.intermediate)
        return out if dtype == torch.float32 else out.to(dtype)


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen3-MoE: LlamaForCausalLM with sparse MLPs (and Qwen3's q/k norms)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        s = self.moe = MoeSettings.from_config(config)
        qkv_bias = config.attention_bias
        for i, layer in enumerate(self.model.layers):
            if s.qk_norm:
                layer.self_attn = LlamaAttention(config, qkv_bias, qk_norm=True)
                layer.self_attn.layer_idx = i
            if i in s.sparse_layers:
                layer.mlp = SparseMoe(config, s)

    # ---- weights --------------------------------------------------------------------------------

    # Expert tensors: per expert (w1/w3/w2, {gate,up,down}_proj) or stacked (no expert index)
    _EXPERT_RE = re.compile(
        r"^(?P<prefix>model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\."
        r"(?:(?P<e>\d+)\.)?(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)"
        r"(?:\.weight)?$")
    _ROUTER_RE = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
    _PART: ClassVar[dict[str, str]] = {
        "w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
        "down_proj": "down", "gate_up_proj": "gate_up"}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Expert and router tensors go into the stacked parameters here (each expert's slice
        once); everything else to LlamaForCausalLM.load_weights. Every parameter must be set."""
        params = dict(self.named_parameters())
        # param name -> [E] flags per slice: gate_up (gate, up), down
        filled: dict[str, np.ndarray] = {}
        rest: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            router = self._ROUTER_RE.match(name)
            if router and f"{router.group(1)}.mlp.gate.weight" in params:
                rest.append((f"{router.group(1)}.mlp.gate.weight", tensor))
                continue
            match = self._EXPERT_RE.match(name)
            if match is None:
                rest.append((name, tensor))
                continue
            part = self._PART[match.group("part")]
            target = f"{match.group('prefix')}.mlp.experts." + (
                "down_proj" if part == "down" else "gate_up_proj")
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{self.config.architecture} (a dense layer?)")
            self._copy_expert(name, params[target], part, match.group("e"), tensor,
                              filled.setdefault(target, np.zeros(
                                  (params[target].shape[0], 2), bool)))
        for target, flags in filled.items():
            if not flags[:, :1 if target.endswith("down_proj") else 2].all():
                raise ValueError(f"checkpoint lacks experts of {target}")
        expert_params = {n for n in params if ".mlp.experts." in n}
        missing = sorted(expert_params - filled.keys())
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        super().load_weights(rest)

    def _dense_parameters(self) -> dict[str, nn.Parameter]:
        # The experts are loaded by load_weights above, not by the base class.
        return {n: p for n, p in self.named_parameters() if ".mlp.experts." not in n}

    def cpu_mlp(self, mlp: nn.Module) -> tuple | None:
        if isinstance(mlp, QuantSparseMoe):  # experts kept in their GGUF encoding
            return None, None, CpuMoe(
                (mlp.router.numpy(), mlp.router_type, None), mlp.gate_up.numpy(),
                mlp.gate_up_type, mlp.down.numpy(), mlp.down_type, mlp.num_experts, mlp.top_k,
                mlp.intermediate, mlp.renormalize)
        if isinstance(mlp, LlamaMLP):
            return super().cpu_mlp(mlp)
        return None  # float experts: the Python model runs

    def _copy_expert(self, name, param, part, expert, tensor, flags) -> None:
        inter = self.moe.intermediate
        slices = {"gate": (0, inter), "up": (inter, inter), "gate_up": (0, 2 * inter),
                  "down": (0, param.shape[1])}
        start, size = slices[part]
        experts = range(param.shape[0]) if expert is None else [int(expert)]
        if expert is not None and int(expert) >= param.shape[0]:
            raise ValueError(f"{name}: expert {expert} of {param.shape[0]}")
        dst = param[experts[0]:experts[-1] + 1].narrow(1, start, size)
        src = tensor if expert is None else tensor.unsqueeze(0)
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit "
                             f"{tuple(dst.shape[1 if expert is not None else 0:])}")
        dst.copy_(src)
        cols = [0] if part == "down" else [0] if part == "gate" else [1] if part == "up" else [0, 1]
        flags[experts[0]:experts[-1] + 1, cols] = True
