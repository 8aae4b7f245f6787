"""Builders for the model fixtures in conftest.py: the default GGUF, an HF fp32 reference of it,
a tiny random Llama (GQA) saved as safetensors, sharded safetensors and a .bin, and LoRA adapters
(PEFT directories and GGUF files) of any of them. benchmarks/serve.py --lora loads this file by
path to make its adapters the same way.

Everything is local; HF_HUB_OFFLINE is set so nothing reaches the hub.
"""

from __future__ import annotations

import copy
import json
import math
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


# ---- one tiny random model per architecture (tests/python/test_models.py) ------------------------

# An odd vocabulary: the byte-level BPE tokenizer below is padded to exactly this many tokens.
TINY_VOCAB = 1001
# Every tiny model's attention heads are 64 wide (the smallest head size the kernels take); GQA
# where the architecture has it; windows shorter than the test sequences.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {"class": "Qwen2", "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "initializer_range": 0.08},
    "qwen3": {"class": "Qwen3", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": True,
              "initializer_range": 0.2, "seed": 2},
    "mistral": {"class": "Mistral", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "max_position_embeddings": 512, "sliding_window": 24,
                "tie_word_embeddings": False, "initializer_range": 0.08},
    "gemma2": {"class": "Gemma2", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 64, "query_pre_attn_scalar": 64, "max_position_embeddings": 512,
               "sliding_window": 16, "attn_logit_softcapping": 8.0,
               "final_logit_softcapping": 12.0, "initializer_range": 0.1, "seed": 2,
               "tie_word_embeddings": False},
    # Tied, as llama.cpp's converter requires (it drops lm_head): the Gemma 2 GGUF's source.
    "gemma2_tied": {"class": "Gemma2", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": 64, "query_pre_attn_scalar": 64, "max_position_embeddings": 512,
                    "sliding_window": 16, "attn_logit_softcapping": 8.0,
                    "final_logit_softcapping": 12.0, "initializer_range": 0.1, "seed": 2},
    "phi3": {"class": "Phi3", "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
             "tie_word_embeddings": False, "initializer_range": 0.12, "seed": 1,
             "rope_scaling": "longrope"},
    "opt": {"class": "OPT", "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 512, "init_std": 0.12, "seed": 2,
            "word_embed_proj_dim": 128, "do_layer_norm_before": True},
    # opt-350m's layout: post-LayerNorm blocks, project_in / project_out around them.
    "opt_post_ln": {"class": "OPT", "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 512, "init_std": 0.08,
                    "word_embed_proj_dim": 64, "do_layer_norm_before": False},
    "gpt2": {"class": "GPT2", "n_embd": 128, "n_layer": 2, "n_head": 2, "n_positions": 512,
             "initializer_range": 0.08},
}
_MODEL_CLASSES = {"Qwen2": "Qwen2ForCausalLM", "Qwen3": "Qwen3ForCausalLM",
                  "Mistral": "MistralForCausalLM", "Gemma2": "Gemma2ForCausalLM",
                  "Phi3": "Phi3ForCausalLM", "OPT": "OPTForCausalLM", "GPT2": "GPT2LMHeadModel"}

_TOKENIZER_TEXT = (
    "The history of the printing press begins with movable type in the fifteenth century. "
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "Q: What is the tallest mountain on Earth, and how tall is it? A: Mount Everest, 8849 m.\n"
    "Write a short poem about the sea. The waves roll in, the tide goes out, and the gulls "
    "circle over the harbour while the fishermen mend their nets and talk about the weather. "
    "Numbers 0123456789, punctuation !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` and spaces.\n"
)


def write_tiny_tokenizer(directory: str) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a fixed text, padded with added
    tokens to TINY_VOCAB ids, saved as tokenizer.json + tokenizer_config.json; id 0 is
    <|endoftext|> (BOS, EOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 40, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT] * 20, trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(TINY_VOCAB - tok.get_vocab_size())])
    assert tok.get_vocab_size() == TINY_VOCAB
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 512}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def tiny_hf_config(name: str):
    """The transformers config object of TINY_CONFIGS[name]."""
    import transformers

    spec = dict(TINY_CONFIGS[name])
    spec.pop("seed", None)
    cls = getattr(transformers, f"{spec.pop('class')}Config")
    if spec.get("rope_scaling") == "longrope":
        half = spec["hidden_size"] // spec["num_attention_heads"] // 2
        spec["rope_scaling"] = {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)],
            "original_max_position_embeddings": spec["original_max_position_embeddings"],
        }
    return cls(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **spec)


def build_tiny_model(root: str, name: str, seed: int | None = None) -> str:
    """TINY_CONFIGS[name] with a seeded random init, saved as an HF directory (safetensors,
    fp32) with the tiny tokenizer; returns the directory. The seeds and init scales are picked
    so that greedy decoding writes varied text with clear top-1 margins, not one token looped."""
    import torch
    import transformers

    cls_name = _MODEL_CLASSES[TINY_CONFIGS[name]["class"]]
    torch.manual_seed(TINY_CONFIGS[name].get("seed", 1234) if seed is None else seed)
    model = getattr(transformers, cls_name)(tiny_hf_config(name)).eval()
    if TINY_CONFIGS[name]["class"] == "Gemma2":
        # Gemma's norms start at w = 0 (scale 1 + w): random ones check the +1 is applied.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    directory = os.path.join(root, name)
    model.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(directory)
    return directory


def load_tiny_hf_model(directory: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# ---- GGUF files of the tiny models, in llama.cpp's layouts --------------------------------------

# HF layer tensor suffix -> llama.cpp name, per GGUF architecture (gguf-py/gguf/constants.py).
_GGUF_LAYER_NAMES = {
    "common": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "gemma2": {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
    "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
}
GGUF_ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2_tied": "gemma2", "phi3": "phi3",
              "gpt2": "gpt2"}


def _gguf_tensor_name(arch: str, hf_name: str) -> str | None:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    i = parts.index("layers") if "layers" in parts else parts.index("h")
    layer, rest = parts[i + 1], ".".join(parts[i + 2:])
    module, _, suffix = rest.rpartition(".")
    names = {**_GGUF_LAYER_NAMES["common"], **_GGUF_LAYER_NAMES.get(arch, {})}
    return f"blk.{layer}.{names[module]}.{suffix}"


def write_tiny_gguf(hf_dir: str, path: str, qtype: str = "F32") -> None:
    """The HF model in hf_dir as llama.cpp's converter would write it (arch GGUF_ARCHS[name]):
    its metadata keys, tensor names and value changes (Gemma's norms + 1, GPT-2's Conv1D
    transposed, Phi-3's rope factor tensors); 2-D weights in qtype (F32, Q8_0 or Q4_0), the
    rest F32. No tokenizer metadata: tests pass the HF directory as the tokenizer."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    name = os.path.basename(hf_dir.rstrip("/"))
    arch = GGUF_ARCHS[name]
    writer = gguf.GGUFWriter(path, arch)
    hidden = cfg.get("hidden_size") or cfg["n_embd"]
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    head_dim = cfg.get("head_dim") or hidden // heads
    writer.add_context_length(cfg.get("max_position_embeddings") or cfg["n_positions"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg.get("num_hidden_layers") or cfg["n_layer"])
    writer.add_feed_forward_length(cfg.get("intermediate_size") or cfg.get("n_inner")
                                   or 4 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(0)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        rope = cfg.get("rope_parameters") or {}
        writer.add_rope_freq_base(float(cfg.get("rope_theta") or rope.get("rope_theta")))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        writer.add_sliding_window(cfg["sliding_window"])
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    if arch == "phi3":
        rope = cfg["rope_parameters"]
        original = rope["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight",
                          np.asarray(rope["short_factor"], np.float32))
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for hf_name, value in sorted(state.items()):
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        value = value.astype(np.float32)
        if arch == "gemma2" and hf_name.endswith("norm.weight"):
            value = value + 1.0
        if arch == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight",
                                                "c_fc.weight")):
            value = value.T
        value = np.ascontiguousarray(value)
        gguf_name = _gguf_tensor_name(arch, hf_name)
        if qtype != "F32" and value.ndim == 2 and value.shape[1] % 32 == 0 \
                and gguf_name != "position_embd.weight":
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
