"""Translating a GGUF file's vocabulary into Hugging Face terms: tensor names, the Q/K row
order, values the converter changed, and an HF-style `config.json` dictionary built from the
metadata. The per-architecture facts (which GGUF architectures load, their tensor names) are
the `gguf` column of the model registry (`fastllm.models.registry`); this module applies them.

Experts: llama.cpp stacks them into 3-D tensors `ffn_{gate,up,down}_exps` ([experts, rows,
cols] in HF order), named here `model.layers.N.mlp.experts.{gate,up,down}_proj.weight` without
an expert index; older Mixtral files keep one tensor per expert, `ffn_{gate,up,down}.E`, named
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`. A `llama` file with experts is a
Mixtral (the registry's row whose layout has `experts`).

llama.cpp's converter permutes the rows of a llama-arch `attn_q`/`attn_k` weight so that
each head's rotary pairs are interleaved (GPT-J style) instead of split into halves (NeoX
style, HF's layout). Within a head of `head_dim` rows, HF row `half * (head_dim//2) + i` is
stored at row `2 * i + half`. `unpermute_qk_rows` undoes this; other architectures' files are
not permuted.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from fastllm.models.registry import GGUFLayout, gguf_layouts, moe_gguf_layouts

from .gguf_file import GGUFFile

_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")

# general.file_type (llama_ftype) -> a sensible torch dtype name for the unquantized model.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


class TensorPlacement(NamedTuple):
    """Where one GGUF tensor goes: its HF name, the heads whose Q/K rows to un-interleave
    (None: none), the offset to subtract from its values (Gemma's norms), and whether the HF
    tensor is its transpose (GPT-2's Conv1D weights)."""

    hf_name: str
    unpermute_heads: int | None = None
    value_offset: float = 0.0
    transposed: bool = False


def check_architecture(gguf: GGUFFile) -> str:
    """The file's architecture; ValueError naming the file when fastllm cannot run it."""
    arch = gguf.architecture
    if arch not in gguf_layouts():
        raise ValueError(
            f"GGUF file {gguf.path} has architecture {arch!r}; supported: "
            f"{sorted(gguf_layouts())}"
        )
    return arch


def gguf_layout(gguf: GGUFFile) -> GGUFLayout:
    return _layout_and_class(gguf)[0]


def _layout_and_class(gguf: GGUFFile) -> tuple[GGUFLayout, str]:
    """The file's layout and the HF architecture it loads as: a `llama` file with experts is the
    registry's expert variant of the layout (Mixtral)."""
    arch = check_architecture(gguf)
    if gguf.metadata.get(f"{arch}.expert_count"):
        moe = moe_gguf_layouts().get(arch)
        if moe is not None:
            return moe
    return gguf_layouts()[arch]


def hf_tensor_name(gguf_name: str, layout: GGUFLayout) -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors HF does not store.

    Raises ValueError for names outside the architecture's layout.
    """
    if gguf_name in layout.ignored:
        return None
    if gguf_name in layout.global_tensors:
        return layout.global_tensors[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in layout.layer_tensors:
        layer, kind, suffix = match.groups()
        return f"{layout.layer_prefix}.{layer}.{layout.layer_tensors[kind]}.{suffix}"
    match = _EXPERT_RE.match(gguf_name) if layout.experts else None
    if match:
        layer, kind, expert = match.groups()
        return f"{layout.layer_prefix}.{layer}.mlp.experts.{expert}.{kind}_proj.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in fastllm's "
                     f"{layout.arch} layout")


def tensor_placement(gguf_name: str, layout: GGUFLayout, config: dict[str, Any]
                     ) -> TensorPlacement | None:
    """Where `gguf_name` goes in the HF model (None: nowhere, HF recomputes it)."""
    hf_name = hf_tensor_name(gguf_name, layout)
    if hf_name is None:
        return None
    heads = qk_heads_to_unpermute(layout.arch, gguf_name, config)
    offset = layout.norm_offset if hf_name.endswith("norm.weight") else 0.0
    transposed = any(hf_name.endswith("." + t) for t in layout.transposed)
    return TensorPlacement(hf_name, heads, offset, transposed)


def qk_heads_to_unpermute(arch: str, gguf_name: str, config: dict[str, Any]) -> int | None:
    """Heads whose rows must be un-interleaved for this tensor of a GGUF of architecture
    ``arch`` (an adapter's too), or None."""
    entry = gguf_layouts().get(arch)
    if entry is None or not entry[0].permuted_qk:
        return None
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config["num_key_value_heads"])
    return None


def unpermute_qk_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave on an array whose first axis is the output rows.

    Works on dequantized values (rows, cols) and on raw quantized rows (rows, row_bytes) alike,
    since a ggml row is a whole number of blocks. Returns a new contiguous array.
    """
    n_rows = rows.shape[0]
    half = n_rows // num_heads // 2
    grouped = rows.reshape(num_heads, half, 2, *rows.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows.shape)


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """An HF-style config dictionary for the model in `gguf` (see `load_config`)."""
    arch = check_architecture(gguf)
    layout, hf_class = _layout_and_class(gguf)
    md = gguf.metadata

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = get("vocab_size")
    if vocab_size is None and "token_embd.weight" in gguf.tensors:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    if vocab_size is None and tokens is not None:
        vocab_size = len(tokens)
    head_dim = int(get("attention.key_length", hidden // heads))
    qkv_bias = "blk.0.attn_q.bias" in gguf.tensors or "blk.0.attn_qkv.bias" in gguf.tensors
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": layout.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", layout.default_rope_theta)),
        "rope_scaling": _rope_scaling(get),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab_size) if vocab_size is not None else None,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": qkv_bias,
        "bos_token_id": _int_or_none(md.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(md.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _int_or_none(md.get("tokenizer.ggml.padding_token_id")),
        "torch_dtype": _FILE_TYPE_DTYPES.get(int(md.get("general.file_type", 0)), "float32"),
    }
    experts = get("expert_count")
    if experts and layout.experts:
        config["num_experts_per_tok"] = int(get("expert_used_count"))
        if arch == "qwen3moe":
            config["num_experts"] = int(experts)
            config["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
            config["norm_topk_prob"] = True  # llama.cpp always renormalizes qwen3moe's top-k
        else:
            config["num_local_experts"] = int(experts)
    sliding_window = get("attention.sliding_window")
    if sliding_window:
        config["sliding_window"] = int(sliding_window)
    for gguf_key, hf_key in layout.config_keys.items():
        value = get(gguf_key)
        if value is not None:
            config[hf_key] = value
    if arch == "gemma2":
        # llama.cpp scales queries by 1/sqrt(head_dim) (gemma2.cpp): the HF
        # query_pre_attn_scalar that gives that scale.
        config["query_pre_attn_scalar"] = head_dim
        config["hidden_activation"] = "gelu_pytorch_tanh"
    if "rope_factors_long.weight" in gguf.tensors:
        config["rope_scaling"] = _longrope_scaling(gguf, get)
    return config


def _longrope_scaling(gguf: GGUFFile, get: Any) -> dict[str, Any]:
    """Phi-3's LongRoPE factors, which llama.cpp stores as two F32 tensors."""
    from .gguf_dequant import dequantize

    def factors(name: str) -> list[float]:
        info = gguf.tensors[name]
        return dequantize(gguf.tensor_bytes(name), info.type_name, info.n_elements).tolist()

    scaling: dict[str, Any] = {
        "rope_type": "longrope",
        "long_factor": factors("rope_factors_long.weight"),
        "short_factor": factors("rope_factors_short.weight"),
        "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
    }
    attn_factor = get("rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    return scaling


def _rope_scaling(get: Any) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if not kind or kind == "none":
        return None
    scaling: dict[str, Any] = {
        "rope_type": str(kind),
        "factor": float(get("rope.scaling.factor", 1)),
    }
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
