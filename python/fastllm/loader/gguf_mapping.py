"""Translating a GGUF file's vocabulary into Hugging Face terms: tensor names, the Q/K row
order, and an HF-style `config.json` dictionary built from the metadata.

Supported architectures: `llama` (Llama 2/3, Mistral, SmolLM2, ...; Mixtral when it has
experts), `qwen2` and `qwen3moe`.

Experts: llama.cpp stacks them into 3-D tensors `ffn_{gate,up,down}_exps` ([experts, rows,
cols] in HF order), named here `model.layers.N.mlp.experts.{gate,up,down}_proj.weight` without
an expert index; older Mixtral files keep one tensor per expert, `ffn_{gate,up,down}.E`, named
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`. The router is `ffn_gate_inp`.

llama.cpp's converter permutes the rows of a llama-arch `attn_q`/`attn_k` weight so that
each head's rotary pairs are interleaved (GPT-J style) instead of split into halves (NeoX
style, HF's layout). Within a head of `head_dim` rows, HF row `half * (head_dim//2) + i` is
stored at row `2 * i + half`. `unpermute_qk_rows` undoes this; qwen2 files are not permuted.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    # gguf architecture -> (HF model_type, HF architecture class)
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# A llama-arch file with experts is Mixtral.
_MIXTRAL = ("mixtral", "MixtralForCausalLM")
# Architectures whose Q/K rows llama.cpp stores interleaved.
_PERMUTED_QK = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Tensors llama.cpp stores that HF recomputes (Llama 3 rope frequency factors).
_IGNORED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# general.file_type (llama_ftype) -> a sensible torch dtype name for the unquantized model.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def check_architecture(gguf: GGUFFile) -> str:
    """The file's architecture; ValueError naming the file when fastllm cannot run it."""
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {gguf.path} has architecture {arch!r}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors HF does not store.

    Raises ValueError for names outside the supported decoder layout.
    """
    if gguf_name in _IGNORED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    match = _EXPERT_RE.match(gguf_name)
    if match:
        layer, kind, expert = match.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{kind}_proj.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in fastllm")


def qk_heads_to_unpermute(arch: str, gguf_name: str, config: dict[str, Any]) -> int | None:
    """Number of heads whose rows must be un-interleaved for this tensor, or None."""
    if arch not in _PERMUTED_QK:
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
    md = gguf.metadata
    model_type, hf_class = SUPPORTED_ARCHITECTURES[arch]
    experts = md.get(f"{arch}.expert_count")
    if arch == "llama" and experts:
        model_type, hf_class = _MIXTRAL

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
    default_theta = 1000000.0 if arch in ("qwen2", "qwen3moe") else 10000.0
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", default_theta)),
        "rope_scaling": _rope_scaling(get),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab_size) if vocab_size is not None else None,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": _int_or_none(md.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(md.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _int_or_none(md.get("tokenizer.ggml.padding_token_id")),
        "torch_dtype": _FILE_TYPE_DTYPES.get(int(md.get("general.file_type", 0)), "float32"),
    }
    if experts:
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
    return config


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
