"""Builders for the model fixtures in conftest.py: the default GGUF, an HF fp32 reference of it,
a tiny random Llama (GQA) saved as safetensors, sharded safetensors and a .bin, and LoRA adapters
(PEFT directories and GGUF files) of any of them. benchmarks/serve.py --lora loads this file by
path to make its adapters the same way.

Everything is local; HF_HUB_OFFLINE is set so nothing reaches the hub.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_LLAMA_SEED = 1234
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,  # the smallest head size the attention kernels take (q/k/v wider than hidden)
    "vocab_size": 49152,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def default_gguf_path() -> str:
    """The default model GGUF (skips nothing: fails loudly when the package is missing)."""
    from fastllm.loader import default_gguf_path as find

    return find()


@dataclass
class HFReference:
    """transformers' own fp32 load of a GGUF: the model, its state dict and its tokenizer."""

    model: Any
    state_dict: dict[str, Any]
    tokenizer: Any


def load_hf_reference(gguf_path: str) -> HFReference:
    """~15 s: transformers dequantizes the GGUF itself and converts its vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return HFReference(model, state, tokenizer)


def write_smollm2_tokenizer_files(directory: str, gguf_path: str) -> None:
    """tokenizer.json (built from the GGUF, equal to HF's conversion) and tokenizer_config.json
    with the special tokens and the chat template."""
    from fastllm.loader.gguf_file import open_gguf
    from fastllm.tokenizer.gguf_tokenizer import build_gguf_tokenizer_json

    gguf = open_gguf(gguf_path)
    md = gguf.metadata
    tokens = md["tokenizer.ggml.tokens"]
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(build_gguf_tokenizer_json(gguf))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[md["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[md["tokenizer.ggml.eos_token_id"]],
        "unk_token": tokens[md["tokenizer.ggml.unknown_token_id"]],
        "pad_token": tokens[md["tokenizer.ggml.padding_token_id"]],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": md["tokenizer.chat_template"],
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


@dataclass
class TinyLlama:
    """A tiny random Llama saved three ways, and its reference state dict."""

    safetensors_dir: str
    sharded_dir: str
    bin_dir: str
    state_dict: dict[str, Any]


def build_tiny_llama(root: str, gguf_path: str) -> TinyLlama:
    """Save `TINY_LLAMA_CONFIG` (fixed seed) under `root` as single and sharded safetensors and
    as pytorch_model.bin, each with the SmolLM2 tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TINY_LLAMA_SEED)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    single = os.path.join(root, "tiny_llama")
    sharded = os.path.join(root, "tiny_llama_sharded")
    as_bin = os.path.join(root, "tiny_llama_bin")
    model.save_pretrained(single, safe_serialization=True)
    # embed_tokens and lm_head are 12.6 MB each: 5 MB shards give several files and an index.
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="5MB")
    os.makedirs(as_bin)
    torch.save(state, os.path.join(as_bin, "pytorch_model.bin"))
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(single, name), os.path.join(as_bin, name))
    for directory in (single, sharded, as_bin):
        write_smollm2_tokenizer_files(directory, gguf_path)
    return TinyLlama(single, sharded, as_bin, state)


# Every projection fastllm's LoRA support targets, by their PEFT (transformers) module names.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_model, path: str, rank: int, alpha: int, targets: list[str],
                      rslora: bool = False, seed: int = 0, std: float = 0.3) -> None:
    """Saves a PEFT LoRA adapter of base_model (left untouched) with random, non-zero A and B
    drawn from N(0, std): 0.3 changes greedy tokens of the tiny models; a real model still
    writes text with about 0.05."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
        init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    model.save_pretrained(path)


def write_gguf_adapter(peft_path: str, out_path: str, num_heads: int, num_kv_heads: int) -> None:
    """The adapter as llama.cpp's converter writes it: general.type adapter, adapter.lora.alpha,
    blk.N.<tensor>.weight.lora_a / lora_b in F32, q/k lora_b rows in llama.cpp's rotary order."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    with open(os.path.join(peft_path, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
            .reshape(w.shape)

    for key, value in sorted(load_file(os.path.join(peft_path, "adapter_model.safetensors"))
                             .items()):
        parts = key.split(".")
        layer = int(parts[parts.index("layers") + 1])
        proj = next(p for p in parts if p in names)
        which = "a" if ".lora_A." in key else "b"
        value = value.astype(np.float32)
        if which == "b" and proj in ("q_proj", "k_proj"):
            value = permute(value, num_heads if proj == "q_proj" else num_kv_heads)
        writer.add_tensor(f"blk.{layer}.{names[proj]}.weight.lora_{which}",
                          np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- mixture-of-experts models ----------------------------------------------------------------

# A tiny Mixtral and a tiny Qwen3-MoE: GQA, 6 experts top-2, an odd vocabulary (the SmolLM2
# tokenizer's 49152 tokens and 17 more rows). (llama.cpp's qwen3moe has experts in every layer,
# so no mlp_only_layers here.)
TINY_MOE_SEED = 0
_TINY_MOE_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 49152 + 17,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_experts_per_tok": 2,
}
TINY_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {**_TINY_MOE_COMMON, "intermediate_size": 96, "num_local_experts": 6},
    # norm_topk_prob: llama.cpp renormalizes qwen3moe's top-k always, so the GGUF's model is this
    "qwen3_moe": {**_TINY_MOE_COMMON, "intermediate_size": 128, "moe_intermediate_size": 96,
                  "num_experts": 6, "norm_topk_prob": True},
}


def build_tiny_moe(root: str, kind: str, gguf_path: str) -> str:
    """Saves the tiny `kind` model (fixed seed) as safetensors with the SmolLM2 tokenizer files
    under root; returns the directory."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(TINY_MOE_SEED)
    config_cls, model_cls = {"mixtral": (MixtralConfig, MixtralForCausalLM),
                             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[kind]
    model = model_cls(config_cls(**TINY_MOE_CONFIGS[kind])).eval()
    directory = os.path.join(root, f"tiny_{kind}")
    model.save_pretrained(directory, safe_serialization=True)
    write_smollm2_tokenizer_files(directory, gguf_path)
    return directory


def moe_gguf_tensors(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's tensors of a Mixtral / Qwen3-MoE from an HF state dict (numpy float32 arrays
    by HF checkpoint name): stacked experts, Q/K rows permuted for the llama arch."""
    import numpy as np

    mixtral = config["model_type"] == "mixtral"
    experts = config.get("num_local_experts") or config["num_experts"]
    dense = set(config.get("mlp_only_layers") or [])

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
            .reshape(w.shape)

    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        q, k = state[f"{p}.self_attn.q_proj.weight"], state[f"{p}.self_attn.k_proj.weight"]
        if mixtral:
            q = permute(q, config["num_attention_heads"])
            k = permute(k, config["num_key_value_heads"])
        out.update({f"{b}.attn_norm.weight": state[f"{p}.input_layernorm.weight"],
                    f"{b}.ffn_norm.weight": state[f"{p}.post_attention_layernorm.weight"],
                    f"{b}.attn_q.weight": q, f"{b}.attn_k.weight": k,
                    f"{b}.attn_v.weight": state[f"{p}.self_attn.v_proj.weight"],
                    f"{b}.attn_output.weight": state[f"{p}.self_attn.o_proj.weight"]})
        if not mixtral:
            out[f"{b}.attn_q_norm.weight"] = state[f"{p}.self_attn.q_norm.weight"]
            out[f"{b}.attn_k_norm.weight"] = state[f"{p}.self_attn.k_norm.weight"]
        if i in dense:
            for part in ("gate", "up", "down"):
                out[f"{b}.ffn_{part}.weight"] = state[f"{p}.mlp.{part}_proj.weight"]
            continue
        moe = f"{p}.block_sparse_moe" if mixtral else f"{p}.mlp"
        names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else \
            {part: f"{part}_proj" for part in ("gate", "up", "down")}
        out[f"{b}.ffn_gate_inp.weight"] = state[f"{moe}.gate.weight"]
        for part, name in names.items():
            out[f"{b}.ffn_{part}_exps.weight"] = np.stack(
                [state[f"{moe}.experts.{e}.{name}.weight"] for e in range(experts)])
    return out


def write_moe_gguf(path: str, config: dict[str, Any], tensors: dict[str, Any], quant: str,
                   tokenizer_gguf: str) -> None:
    """A GGUF file as llama.cpp's converter writes a Mixtral (arch llama with experts) or a
    Qwen3-MoE (arch qwen3moe): metadata, the tokenizer of tokenizer_gguf, tensors (moe_gguf_tensors)
    with norms and the router in F32 and the rest in quant (F32, Q8_0 or Q4_0)."""
    import gguf
    import numpy as np

    mixtral = config["model_type"] == "mixtral"
    arch = "llama" if mixtral else "qwen3moe"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_expert_count(config.get("num_local_experts") or config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if not mixtral:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_file_type(file_type)
    reader = gguf.GGUFReader(tokenizer_gguf)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        keep_f32 = value.ndim == 1 or "ffn_gate_inp" in name or quant == "F32"
        if keep_f32:
            writer.add_tensor(name, value)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_tiny_moe_gguf(directory: str, kind: str, quant: str, tokenizer_gguf: str) -> str:
    """The tiny model saved in `directory` (build_tiny_moe) as a GGUF in quant; returns its path."""
    import json as _json

    from safetensors.numpy import load_file

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = _json.load(f)
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta",
                                                                              10000.0))
    state = load_file(os.path.join(directory, "model.safetensors"))
    path = os.path.join(directory, f"tiny_{kind}.{quant}.gguf")
    write_moe_gguf(path, config, moe_gguf_tensors(state, config), quant, tokenizer_gguf)
    return path
