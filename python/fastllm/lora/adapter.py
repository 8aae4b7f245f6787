"""Reading LoRA adapters: PEFT directories and GGUF adapter files, into float32 matrices.

A LoRA module adds scale * B (A x) to a projection's output: A is [rank, in_features], B is
[out_features, rank], scale = alpha / rank (alpha / sqrt(rank) for rsLoRA). Modules are kept per
(layer, projection) with the projection named as in HF Llama-family models (q_proj ... down_proj);
everything about the file is checked against the base model before anything is used, and every
problem is a ValueError naming it."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from fastllm.config import ModelConfig

# The projections an adapter may target, in the order the executors index them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_PEFT_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_GGUF_TARGETS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
                 "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
                 "ffn_down": "down_proj"}
_GGUF_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight\.lora_([ab])$")


@dataclass
class LoraModule:
    a: np.ndarray  # float32 [rank, in_features], C-contiguous
    b: np.ndarray  # float32 [out_features, rank], C-contiguous
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @functools.cached_property
    def bt(self) -> np.ndarray:
        """B transposed, [rank, out_features] C-contiguous: the layout the kernels read (each
        rank step over contiguous output columns), made once per adapter."""
        return np.ascontiguousarray(self.b.T)

    def to(self, dtype: str) -> None:
        """Keeps A and B^T in dtype ("float32" or "float16", what the executors read)."""
        np_dtype = np.dtype(dtype)
        self.a = np.ascontiguousarray(self.a.astype(np_dtype, copy=False))
        self.__dict__["bt"] = np.ascontiguousarray(self.bt.astype(np_dtype, copy=False))


@dataclass
class LoraAdapter:
    name: str
    lora_id: int
    path: str
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)
    base_model_name: str | None = None
    dtype: str = "float32"  # of A and B^T once prepared

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def prepare(self, dtype: str = "float32") -> None:
        """Readies every module for the executors before they read it: B transposed, A and B^T
        in dtype (float16 halves the bytes a step reads for its adapters)."""
        self.dtype = dtype
        for m in self.modules.values():
            m.to(dtype)

    def layer_modules(self, num_layers: int) -> list[list[LoraModule | None]]:
        """[layer][target index] -> module or None, targets in LORA_TARGETS order."""
        return [[self.modules.get((layer, t)) for t in LORA_TARGETS] for layer in range(num_layers)]


def projection_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(out_features, in_features) of a base projection."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    h, inter = config.hidden_size, config.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}[target]


def load_adapter(name: str, lora_id: int, path: str, config: ModelConfig, max_rank: int
                 ) -> LoraAdapter:
    """The adapter at path (a PEFT directory or a GGUF LoRA file), checked against the base
    model's config and max_rank."""
    if not os.path.exists(path):
        raise ValueError(f"LoRA adapter {name!r}: {path} does not exist")
    try:
        if os.path.isdir(path):
            modules, base = _read_peft(path)
        else:
            modules, base = _read_gguf(path, config)
    except ValueError as e:
        raise ValueError(f"LoRA adapter {name!r}: {e}") from None
    except OSError as e:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {path}: {e}") from None
    adapter = LoraAdapter(name, lora_id, path, base_model_name=base)
    for (layer, target), module in modules.items():
        where = f"LoRA adapter {name!r}: layer {layer} {target}"
        if not 0 <= layer < config.num_hidden_layers:
            raise ValueError(f"{where}: the base model has {config.num_hidden_layers} layers")
        out_f, in_f = projection_shape(config, target)
        r = module.rank
        if r < 1 or module.a.shape != (r, in_f) or module.b.shape != (out_f, r):
            raise ValueError(f"{where}: lora_A {tuple(module.a.shape)} / lora_B "
                             f"{tuple(module.b.shape)} do not fit the base projection "
                             f"[{out_f}, {in_f}] (an adapter for another base model?)")
        if r > max_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {r}, above max_lora_rank "
                             f"{max_rank}")
        if not (np.isfinite(module.a).all() and np.isfinite(module.b).all()
                and math.isfinite(module.scale)):
            raise ValueError(f"{where}: non-finite weights")
        adapter.modules[(layer, target)] = module
    if not adapter.modules:
        raise ValueError(f"LoRA adapter {name!r}: {path} holds no LoRA weights")
    return adapter


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _read_peft(path: str) -> tuple[dict[tuple[int, str], LoraModule], str | None]:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path} has no adapter_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter_config.json is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"PEFT type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"LoRA bias {cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ValueError(f"modules_to_save {cfg['modules_to_save']} (fully trained modules such "
                         "as embeddings or lm_head) are not supported")
    if cfg.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out adapters (Conv1D bases) are not supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [t for t in LORA_TARGETS if re.fullmatch(targets, t) or targets.endswith(t)]
    unsupported = sorted(set(targets) - set(LORA_TARGETS))
    if unsupported:
        raise ValueError(f"unsupported target module(s) {unsupported}; supported: "
                         f"{', '.join(LORA_TARGETS)}")
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    tensors = _read_peft_tensors(path)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_NAME.search(key)
        if m is None:
            if "lora_" in key or "embed" in key or "lm_head" in key:
                raise ValueError(f"unsupported adapter tensor {key}")
            continue
        layer, target, which = int(m.group(1)), m.group(2), m.group(3)
        if target not in LORA_TARGETS:
            raise ValueError(f"unsupported target module {target!r}; supported: "
                             f"{', '.join(LORA_TARGETS)}")
        pairs.setdefault((layer, target), {})[which] = _f32(value)
    modules = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {key[0]} {key[1]} lacks lora_A or lora_B")
        r = ab["A"].shape[0]
        a = next((float(v) for k, v in alpha_pattern.items() if key[1].endswith(k)), alpha)
        scale = a / math.sqrt(r) if rslora else a / r
        modules[key] = LoraModule(ab["A"], ab["B"], scale)
    return modules, cfg.get("base_model_name_or_path")


def _read_peft_tensors(path: str) -> dict[str, np.ndarray]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors import SafetensorError, safe_open

        out = {}
        try:
            with safe_open(st, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[key] = f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"cannot read {st}: {e}") from None
        return out
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.exists(binary):
        from fastllm.torch_extra import torch

        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise ValueError(f"{path} has no adapter_model.safetensors or adapter_model.bin")


def _read_gguf(path: str, config: ModelConfig) -> tuple[dict[tuple[int, str], LoraModule], None]:
    from fastllm.loader import dequantize, open_gguf
    from fastllm.loader.gguf_mapping import qk_heads_to_unpermute, unpermute_qk_rows

    gguf = open_gguf(path)
    md = gguf.metadata
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise ValueError(f"{path} is not a GGUF LoRA adapter (general.type "
                         f"{md.get('general.type')!r}, adapter.type {md.get('adapter.type')!r})")
    alpha = md.get("adapter.lora.alpha")
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, info in gguf.tensors.items():
        m = _GGUF_NAME.match(name)
        if m is None or m.group(2) not in _GGUF_TARGETS:
            raise ValueError(f"unsupported adapter tensor {name}")
        values = dequantize(gguf.tensor_bytes(name), info.type_name, info.n_elements)
        values = values.reshape(info.shape)
        layer, target, which = int(m.group(1)), _GGUF_TARGETS[m.group(2)], m.group(3)
        if which == "b":
            # Output rows of q/k are stored in llama.cpp's rotary order, as the base weights are.
            heads = qk_heads_to_unpermute(gguf.architecture, name, {
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads})
            if heads is not None:
                values = unpermute_qk_rows(values, heads)
        pairs.setdefault((layer, target), {})[which] = _f32(values)
    modules = {}
    for key, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"layer {key[0]} {key[1]} lacks lora_a or lora_b")
        r = ab["a"].shape[0]
        modules[key] = LoraModule(ab["a"], ab["b"], float(alpha if alpha else r) / r)
    return modules, None
