"""The model registry: one table, one row per architecture (the ``architectures[0]`` name of an HF
``config.json``). A row says

* which torch class runs it (imported on first use, so the torch-free path can read the table),
* how its checkpoint names and config keys differ from the class's (``weight_prefixes``,
  ``config_aliases``: bare ``OPTModel`` / ``GPT2Model`` checkpoints, GPT-2's ``n_embd`` keys),
* its GGUF layout where llama.cpp defines one (``GGUFLayout``: the ``general.architecture`` name,
  the GGUF -> HF tensor names, what llama.cpp's converter changed in the values),
* which executors run it: ``native_cpu`` (the C++ layer loop, ``llama_decoder.cpp``, and the
  torch-free GGUF path) and/or ``torch`` (the torch model, every architecture).

This module is data only and imports nothing from fastllm: the loader (below the models layer)
reads the GGUF and config columns from it, the one import against the layer direction
(tests/python/test_import_layers.py names it). To add an architecture, add a row to ``_ROWS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

NATIVE_CPU = "native_cpu"
TORCH = "torch"


def _frozen(mapping: dict[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp stores one architecture in a GGUF file.

    ``layer_tensors`` maps the ``blk.N.<name>`` part to the HF name under ``layer_prefix.N``;
    ``global_tensors`` maps whole GGUF names to HF names; names in ``ignored`` (and the layout's
    rope factor tensors) carry no HF parameter. ``permuted_qk``: llama.cpp interleaved the rows
    of each Q/K head (its ``llama`` arch). ``norm_offset``: added to every ``*norm.weight`` by
    the converter (Gemma's ``1 + w``), subtracted on load. ``transposed``: HF names whose
    checkpoint tensor is the transpose of the GGUF's (GPT-2's Conv1D weights; the GGUF holds
    them as ``[out, in]`` rows, which the quantized GEMM reads as they are).
    ``config_keys``: GGUF metadata keys (without the ``<arch>.`` prefix) -> HF config keys,
    beyond the ones every architecture shares (``gguf_mapping.gguf_config``). ``experts``: the
    layout of a mixture-of-experts file (a ``llama`` file with ``expert_count`` is a Mixtral);
    per-expert tensors ``ffn_{gate,up,down}.E`` load too."""

    arch: str
    model_type: str
    layer_tensors: Mapping[str, str]
    global_tensors: Mapping[str, str]
    layer_prefix: str = "model.layers"
    permuted_qk: bool = False
    norm_offset: float = 0.0
    transposed: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset({"rope_freqs.weight"})
    config_keys: Mapping[str, str] = field(default_factory=_frozen)
    default_rope_theta: float = 10000.0
    experts: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One architecture (see the module docstring)."""

    architecture: str
    model_class: str  # "module:Class" under fastllm.models
    executors: tuple[str, ...]
    gguf: GGUFLayout | None = None
    # (checkpoint name prefix, the class's) pairs for checkpoints saved without the LM wrapper
    weight_prefixes: tuple[tuple[str, str], ...] = ()
    # config.json key -> the key the class (and fastllm's ModelConfig) reads
    config_aliases: Mapping[str, str] = field(default_factory=_frozen)

    def load_class(self) -> type:
        module, _, name = self.model_class.partition(":")
        return getattr(importlib.import_module(f"fastllm.models.{module}"), name)


# ---- GGUF layouts (llama.cpp's gguf-py/gguf/constants.py and src/llama-arch.cpp name them) --------

_LLAMA_GLOBALS = _frozen({
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
})
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GGUF_LLAMA = GGUFLayout("llama", "llama", _frozen(_LLAMA_LAYER), _LLAMA_GLOBALS, permuted_qk=True)
# Experts as llama.cpp stacks them ([experts, rows, cols]) and the router.
_EXPERT_LAYER = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
GGUF_MIXTRAL = GGUFLayout("llama", "mixtral", _frozen({**_LLAMA_LAYER, **_EXPERT_LAYER}),
                          _LLAMA_GLOBALS, permuted_qk=True, experts=True)
GGUF_QWEN2 = GGUFLayout("qwen2", "qwen2", _frozen(_LLAMA_LAYER), _LLAMA_GLOBALS,
                        default_rope_theta=1000000.0)
GGUF_QWEN3 = GGUFLayout(
    "qwen3", "qwen3",
    _frozen({**_LLAMA_LAYER, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
    _LLAMA_GLOBALS, default_rope_theta=1000000.0)
GGUF_QWEN3MOE = GGUFLayout(
    "qwen3moe", "qwen3_moe",
    _frozen({**_LLAMA_LAYER, **_EXPERT_LAYER, "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm"}),
    _LLAMA_GLOBALS, default_rope_theta=1000000.0, experts=True)
GGUF_GEMMA2 = GGUFLayout(
    "gemma2", "gemma2",
    _frozen({**_LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}),
    _LLAMA_GLOBALS, norm_offset=1.0,
    config_keys=_frozen({"attn_logit_softcapping": "attn_logit_softcapping",
                         "final_logit_softcapping": "final_logit_softcapping"}))
GGUF_PHI3 = GGUFLayout(
    "phi3", "phi3",
    _frozen({"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}),
    _LLAMA_GLOBALS,
    ignored=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"}))
GGUF_GPT2 = GGUFLayout(
    "gpt2", "gpt2",
    _frozen({"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
             "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}),
    _frozen({"token_embd.weight": "transformer.wte.weight",
             "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight",
             "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"}),
    layer_prefix="transformer.h",
    transposed=frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                          "mlp.c_proj.weight"}),
    config_keys=_frozen({"attention.layer_norm_epsilon": "layer_norm_epsilon"}))


# ---- the table -------------------------------------------------------------------------------------

_BOTH = (NATIVE_CPU, TORCH)
_TORCH = (TORCH,)

_ROWS = (
    ModelSpec("LlamaForCausalLM", "llama:LlamaForCausalLM", _BOTH, GGUF_LLAMA),
    ModelSpec("MistralForCausalLM", "llama:LlamaForCausalLM", _BOTH, GGUF_LLAMA),
    ModelSpec("Qwen2ForCausalLM", "llama:LlamaForCausalLM", _BOTH, GGUF_QWEN2),
    ModelSpec("Qwen3ForCausalLM", "llama:LlamaForCausalLM", _BOTH, GGUF_QWEN3),
    ModelSpec("MixtralForCausalLM", "moe:MoeForCausalLM", _BOTH, GGUF_MIXTRAL),
    ModelSpec("Qwen3MoeForCausalLM", "moe:MoeForCausalLM", _BOTH, GGUF_QWEN3MOE),
    ModelSpec("Phi3ForCausalLM", "llama:LlamaForCausalLM", _TORCH, GGUF_PHI3),
    ModelSpec("Gemma2ForCausalLM", "gemma2:Gemma2ForCausalLM", _TORCH, GGUF_GEMMA2),
    ModelSpec("OPTForCausalLM", "opt:OPTForCausalLM", _TORCH,
              weight_prefixes=(("decoder.", "model.decoder."),),
              config_aliases=_frozen({"ffn_dim": "intermediate_size"})),
    ModelSpec("GPT2LMHeadModel", "gpt2:GPT2LMHeadModel", _TORCH, GGUF_GPT2,
              weight_prefixes=(("wte.", "transformer.wte."), ("wpe.", "transformer.wpe."),
                               ("h.", "transformer.h."), ("ln_f.", "transformer.ln_f.")),
              config_aliases=_frozen({"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
                                      "n_head": "num_attention_heads",
                                      "n_inner": "intermediate_size",
                                      "n_positions": "max_position_embeddings"})),
)

ARCHITECTURES: Mapping[str, ModelSpec] = MappingProxyType({r.architecture: r for r in _ROWS})


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_spec(architecture: str) -> ModelSpec:
    """The row of ``architecture``; ValueError naming the supported ones when there is none."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    return spec


def gguf_layouts() -> dict[str, tuple[GGUFLayout, str]]:
    """GGUF ``general.architecture`` -> (its layout, the HF architecture it loads as: the first
    row naming the layout, e.g. ``llama`` files load as LlamaForCausalLM)."""
    out: dict[str, tuple[GGUFLayout, str]] = {}
    for row in _ROWS:
        if row.gguf is not None and row.gguf.arch not in out:
            out[row.gguf.arch] = (row.gguf, row.architecture)
    return out


def moe_gguf_layouts() -> dict[str, tuple[GGUFLayout, str]]:
    """Like ``gguf_layouts``, for files with experts (``<arch>.expert_count`` in the metadata)."""
    out: dict[str, tuple[GGUFLayout, str]] = {}
    for row in _ROWS:
        if row.gguf is not None and row.gguf.experts and row.gguf.arch not in out:
            out[row.gguf.arch] = (row.gguf, row.architecture)
    return out


def moe_architectures() -> frozenset[str]:
    """The mixture-of-experts architectures (``fastllm.models.moe``)."""
    return frozenset(r.architecture for r in _ROWS if r.gguf is not None and r.gguf.experts)


def native_cpu_architectures() -> frozenset[str]:
    """The architectures the native CPU decoder (and the torch-free GGUF path) runs."""
    return frozenset(r.architecture for r in _ROWS if NATIVE_CPU in r.executors)
