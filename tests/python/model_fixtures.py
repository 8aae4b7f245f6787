"""Builders for the model fixtures in conftest.py: the default GGUF, an HF fp32 reference of it,
and a tiny random Llama (GQA) saved as safetensors, sharded safetensors and a .bin.

Everything is local; HF_HUB_OFFLINE is set so nothing reaches the hub.
"""

from __future__ import annotations

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
