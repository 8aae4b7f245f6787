"""Tiny random Llama checkpoints in the quantized HF formats, packed here from known integer codes
and scales (numpy only), with each linear's reference weight computed straight from those codes:

    ckpt = build_checkpoint(tmp_path, "gptq", bits=4, group_size=128, sym=False)
    ckpt.directory     # config.json (with quantization_config), model.safetensors, tokenizer
    ckpt.reference     # {HF name: float32 weight}: what the checkpoint means, for transformers

The reference never goes through fastllm's decoders: w[n, k] = s[n, g(k)] * (q[n, k] - z[n, g(k)])
from the arrays the packers were given (FP8: the e4m3 byte's value times its scale).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from model_fixtures import write_smollm2_tokenizer_files

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 49152,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    return {f"model.layers.{i}.{name}": shape for i in range(config["num_hidden_layers"])
            for name, shape in shapes.items()}


# ---- writing --------------------------------------------------------------------------------

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int32"): "I32",
           np.dtype("int64"): "I64", np.dtype("int8"): "I8"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray | tuple[str, np.ndarray]]) -> None:
    """A safetensors file; a (dtype name, uint8/uint16 array) pair stores raw codes (F8_E4M3,
    BF16) under that dtype."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        dtype, array = value if isinstance(value, tuple) else (_DTYPES[value.dtype], value)
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.writelines(blobs)


def bf16_codes(values: np.ndarray) -> np.ndarray:
    """bfloat16 codes of values that are bf16-exact (the caller rounds them first)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def round_bf16(values: np.ndarray) -> np.ndarray:
    return (bf16_codes(values).astype(np.uint32) << 16).view(np.float32)


def e4m3_value(codes: np.ndarray) -> np.ndarray:
    """Value of each e4m3fn byte, computed from its fields (the reference's own decoder)."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 7
    value = np.where(e == 0, m * 2.0 ** -9, (8 + m) * 2.0 ** (e - 10))
    return (sign * value).astype(np.float32)


# ---- packers ---------------------------------------------------------------------------------


def pack_along(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words packing 32 / bits unsigned values along axis, value i at bits * i."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    words = np.zeros(v.shape[:1] + v.shape[2:], np.uint32)
    for i in range(per):
        words |= v[:, i] << np.uint32(bits * i)
    return np.ascontiguousarray(np.moveaxis(words, 0, axis)).view(np.int32)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit values -> [rows, cols / 8] words, column ORDER[i] in nibble i."""
    rows, cols = values.shape
    v = values.astype(np.uint32).reshape(rows, cols // 8, 8)
    words = np.zeros((rows, cols // 8), np.uint32)
    for i, column in enumerate(AWQ_ORDER):
        words |= v[:, :, column] << np.uint32(4 * i)
    return words.view(np.int32)


@dataclass
class IntWeight:
    codes: np.ndarray  # [N, K] unsigned codes
    scales: np.ndarray  # [N, G] float32 (fp16- or bf16-exact)
    zeros: np.ndarray  # [N, G] unsigned zero points
    g_idx: np.ndarray  # [K] group of each input column

    def reference(self) -> np.ndarray:
        n, k = self.codes.shape
        out = np.empty((n, k), np.float32)
        for col in range(k):
            g = self.g_idx[col]
            out[:, col] = self.scales[:, g] * (self.codes[:, col].astype(np.float32)
                                               - self.zeros[:, g])
        return out


def random_int_weight(rng, n: int, k: int, bits: int, group: int, sym: bool,
                      desc_act: bool = False, scale_round=np.float16) -> IntWeight:
    groups = k // (k if group == -1 else group)
    size = k // groups
    codes = rng.integers(0, 1 << bits, (n, k))
    # Codes centred on the zero have a standard deviation of ~0.6 * 2^(bits-1): a gain of ~0.5
    # per linear keeps the random model smooth enough that int8 activations stay small.
    base = 0.5 / (np.sqrt(k) * (1 << (bits - 1)) * 0.6)
    scales = np.asarray(scale_round(base * rng.uniform(0.5, 1.5, (n, groups)))).astype(np.float32)
    half = 1 << (bits - 1)
    zeros = (np.full((n, groups), half) if sym else
             rng.integers(half - 3, half + 4, (n, groups)))
    g_idx = np.arange(k) // size
    if desc_act:
        g_idx = rng.permutation(g_idx)  # every group keeps its size, its columns scattered
    return IntWeight(codes, scales, zeros, g_idx)


# ---- checkpoints -----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    directory: str
    reference: dict[str, np.ndarray]  # every weight as float32, what the checkpoint means
    config: dict


def _float_params(rng, config: dict) -> dict[str, np.ndarray]:
    """Norms, embedding and output projection: fp16 values (stored as fp16)."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    out = {"model.embed_tokens.weight": rng.normal(0, 1.0, (vocab, h)),
           "lm_head.weight": rng.normal(0, 0.15, (vocab, h)),
           "model.norm.weight": rng.uniform(0.8, 1.2, h)}
    if config["tie_word_embeddings"]:
        del out["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = rng.uniform(0.8, 1.2, h)
    return {name: v.astype(np.float16) for name, v in out.items()}


def build_checkpoint(root: str, method: str, seed: int = 0, **options) -> Checkpoint:
    """A tiny Llama in ``method``'s format (see the builders below for ``options``)."""
    rng = np.random.default_rng(seed)
    config = dict(CONFIG)
    tensors: dict = {}
    reference: dict[str, np.ndarray] = {}
    for name, value in _float_params(rng, config).items():
        tensors[name] = value
        reference[name] = value.astype(np.float32)
    quant_config = _BUILDERS[method](rng, config, tensors, reference, **options)
    config["quantization_config"] = quant_config
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    directory = os.path.join(root, f"{method}-{tag}-{seed}")
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    from fastllm.loader import default_gguf_path

    write_smollm2_tokenizer_files(directory, default_gguf_path())
    return Checkpoint(directory, reference, config)


def _gptq(rng, config, tensors, reference, bits=4, group_size=128, sym=True, desc_act=False,
          v2=False):
    per = 32 // bits
    for name, (n, k) in linear_shapes(config).items():
        w = random_int_weight(rng, n, k, bits, group_size, sym, desc_act)
        stored_zeros = w.zeros if v2 else w.zeros - 1  # v1 stores zero - 1
        tensors[f"{name}.qweight"] = pack_along(w.codes.T, bits, axis=0)
        tensors[f"{name}.qzeros"] = pack_along(stored_zeros.T & ((1 << bits) - 1), bits, axis=1)
        tensors[f"{name}.scales"] = w.scales.T.astype(np.float16)
        tensors[f"{name}.g_idx"] = w.g_idx.astype(np.int32)
        assert tensors[f"{name}.qweight"].shape == (k // per, n)
        reference[f"{name}.weight"] = w.reference()
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": desc_act, "checkpoint_format": "gptq_v2" if v2 else "gptq"}


def _awq(rng, config, tensors, reference, group_size=128):
    for name, (n, k) in linear_shapes(config).items():
        w = random_int_weight(rng, n, k, 4, group_size, sym=False)
        tensors[f"{name}.qweight"] = pack_awq(w.codes.T)
        tensors[f"{name}.qzeros"] = pack_awq(w.zeros.T)
        tensors[f"{name}.scales"] = w.scales.T.astype(np.float16)
        reference[f"{name}.weight"] = w.reference()
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
            "version": "gemm"}


def _ct_args(bits, strategy, group_size, sym, kind="int"):
    return {"num_bits": bits, "type": kind, "symmetric": sym, "strategy": strategy,
            "group_size": group_size if strategy == "group" else None, "dynamic": False}


def _compressed(rng, config, tensors, reference, scheme="w4a16", strategy="group",
                group_size=128, sym=True):
    """scheme: w4a16 / w8a16 (pack-quantized), w8a8 (int-quantized, dynamic per-token
    activations), fp8 (float-quantized; strategy tensor or channel)."""
    inputs = None
    if scheme in ("w4a16", "w8a16"):
        bits = 4 if scheme == "w4a16" else 8
        fmt = "pack-quantized"
        for name, (n, k) in linear_shapes(config).items():
            group = group_size if strategy == "group" else -1
            w = random_int_weight(rng, n, k, bits, group, sym, scale_round=round_bf16)
            tensors[f"{name}.weight_packed"] = pack_along(w.codes, bits, axis=1)
            tensors[f"{name}.weight_shape"] = np.array([n, k], np.int64)
            tensors[f"{name}.weight_scale"] = ("BF16", bf16_codes(w.scales))
            if not sym:  # stored signed + offset, packed along the output dimension
                tensors[f"{name}.weight_zero_point"] = pack_along(w.zeros, bits, axis=0)
            reference[f"{name}.weight"] = w.reference()
        weights = _ct_args(bits, strategy, group_size, sym)
    elif scheme == "w8a8":
        fmt = "int-quantized"
        for name, (n, k) in linear_shapes(config).items():
            w = random_int_weight(rng, n, k, 8, -1, True)
            tensors[f"{name}.weight"] = (w.codes - 128).astype(np.int8)
            tensors[f"{name}.weight_scale"] = w.scales.astype(np.float16)  # [N, 1]
            reference[f"{name}.weight"] = w.reference()
        weights = _ct_args(8, "channel", None, True)
        inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                  "dynamic": True}
    else:
        fmt = "float-quantized"
        for name, (n, k) in linear_shapes(config).items():
            codes, value = _random_e4m3(rng, n, k)
            rows = 1 if strategy == "tensor" else n
            scale = (rng.uniform(0.25, 0.75, (rows, 1)) / (8 * np.sqrt(k))).astype(np.float32)
            tensors[f"{name}.weight"] = ("F8_E4M3", codes)
            tensors[f"{name}.weight_scale"] = scale.reshape(-1) if rows == 1 else scale
            tensors[f"{name}.input_scale"] = np.array([0.05], np.float32)
            reference[f"{name}.weight"] = value * scale
        weights = _ct_args(8, strategy, None, True, kind="float")
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                  "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": inputs}},
            "ignore": ["lm_head"]}


def _random_e4m3(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 codes with exponents 4..11 (|value| in [2^-3, 15]) and their values."""
    sign = rng.integers(0, 2, (n, k)) << 7
    exponent = rng.integers(4, 12, (n, k)) << 3
    mantissa = rng.integers(0, 8, (n, k))
    codes = (sign | exponent | mantissa).astype(np.uint8)
    return codes, e4m3_value(codes)


def _fp8(rng, config, tensors, reference, kv_scales=None):
    for name, (n, k) in linear_shapes(config).items():
        codes, value = _random_e4m3(rng, n, k)
        scale = np.float32(rng.uniform(0.25, 0.75) / (8 * np.sqrt(k)))
        tensors[f"{name}.weight"] = ("F8_E4M3", codes)
        tensors[f"{name}.weight_scale"] = np.array(scale, np.float32)
        tensors[f"{name}.input_scale"] = np.array(0.05, np.float32)
        reference[f"{name}.weight"] = value * scale
    if kv_scales is not None:
        for i in range(config["num_hidden_layers"]):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = np.array(kv_scales[0], np.float32)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = np.array(kv_scales[1], np.float32)
    return {"quant_method": "fp8", "activation_scheme": "static"}


_BUILDERS = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed, "fp8": _fp8}


def hf_reference_model(ckpt: Checkpoint):
    """transformers' LlamaForCausalLM (fp32) holding the reference weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    state = {k: torch.from_numpy(v) for k, v in ckpt.reference.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model
