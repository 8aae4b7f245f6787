"""Engine configuration: one EngineArgs dataclass, and the model's architecture as read from its
config. Environment variables (FASTLLM_*) give defaults; explicit arguments override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from fastllm import _C

# Accepted spellings of the float dtypes -> canonical names (torch.<name>; numpy has all but
# bfloat16). Dtypes stay names until an executor needs its array library's dtype object.
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a number") from e


@dataclass
class EngineArgs:
    """Everything needed to build an engine. Field names follow the CLI flags
    (``--max-model-len`` -> ``max_model_len``)."""

    model: str | None = None  # local dir or .gguf; None = the default model
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | safetensors | pt | gguf | dummy
    # auto: keep a GGUF file's quantized linear layers quantized on the CPU; dequantize: float
    quantized_weights: str = "auto"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    # auto: the model dtype, except float16 for a GGUF kept quantized on the CPU (its activations
    # run in float32; half-precision keys and values halve the cache's memory and bandwidth)
    kv_cache_dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    max_model_len: int | None = None
    # Tokens per KV block; None: 16 on a GPU, 8 on a CPU (finer prefix-cache reuse and less
    # partial-block memory, at no measurable cost there)
    block_size: int | None = None
    enable_prefix_caching: bool = True
    # Digest keying the prefix cache: sha256 (collision-resistant) or fast (SipHash-128 under a
    # random per-process key); hits are checked against the cached tokens either way
    prefix_caching_hash_algo: str = "sha256"
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_logprobs: int = 20
    swap_space: float = 4.0  # GiB of host memory for preemption by swap (GPU only)
    preemption_mode: str = "recompute"  # recompute | swap
    scheduling_policy: str = "fcfs"  # fcfs | priority
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kvcache_space: float | None = None  # GiB; default FASTLLM_CPU_KVCACHE_SPACE or 4
    rope_scaling: dict | None = None
    rope_theta: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    trust_remote_code: bool = False
    served_model_name: list[str] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def validate(self) -> None:
        if self.block_size is not None and self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        if self.load_format not in ("auto", "safetensors", "pt", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.quantized_weights not in ("auto", "dequantize"):
            raise ValueError(f"quantized_weights must be 'auto' or 'dequantize', got "
                             f"{self.quantized_weights!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto', 'float32', 'float16' or "
                             f"'bfloat16', got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got "
                             f"{self.preemption_mode!r}")
        if self.prefix_caching_hash_algo not in ("sha256", "fast"):
            raise ValueError(f"prefix_caching_hash_algo must be 'sha256' or 'fast', got "
                             f"{self.prefix_caching_hash_algo!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got "
                             f"{self.scheduling_policy!r}")
        if self.tensor_parallel_size != 1 or self.pipeline_parallel_size != 1:
            raise ValueError("tensor/pipeline parallelism (size > 1) is not supported yet")
        if self.trust_remote_code:
            raise ValueError("trust_remote_code is not supported: fastllm runs only its own "
                             "model definitions")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")

    def resolve_device(self) -> str:
        """"cpu" or "cuda". On "auto", torch is asked only when a GPU could exist (the extension
        has CUDA kernels and a GPU driver is there), so CPU-only machines decide without
        importing it."""
        if self.device == "auto":
            if not (_C.ops.built_with_cuda() and _gpu_device_nodes_present()):
                return "cpu"
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        return self.device

    def use_quantized_weights(self, is_gguf: bool, device: str) -> bool:
        """"auto" keeps a GGUF file's quantization on the CPU; "dequantize" always loads float."""
        return (self.quantized_weights == "auto" and is_gguf and device == "cpu"
                and self.load_format in ("auto", "gguf"))

    def resolve_dtype(self, config_dtype: str | None, device: str) -> str:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device == "cpu":
            return "float32"  # fp16/bf16 GEMMs are slow on CPUs without AMX
        if config_dtype in _DTYPES:
            dt = _DTYPES[config_dtype]
            return "float16" if dt == "float32" else dt
        return "float16"

    def resolve_kv_cache_dtype(self, model_dtype: str, quantized_on_cpu: bool) -> str:
        if self.kv_cache_dtype != "auto":
            return _DTYPES[self.kv_cache_dtype]
        return "float16" if quantized_on_cpu else model_dtype

    def resolve_block_size(self, device: str) -> int:
        if self.block_size is not None:
            return self.block_size
        return 8 if device == "cpu" else 16

    def cpu_kv_bytes(self) -> int:
        gib = self.cpu_kvcache_space
        if gib is None:
            gib = _env_float("FASTLLM_CPU_KVCACHE_SPACE", 4.0)
        if gib <= 0:
            raise ValueError("the CPU KV cache space must be positive")
        return int(gib * (1 << 30))


def _gpu_device_nodes_present() -> bool:
    """Whether a GPU driver's device node exists (NVIDIA, AMD ROCm, WSL2): without one, torch
    sees no GPU either."""
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


@dataclass
class ModelConfig:
    """The architecture facts the model code needs, read from an HF-style config dict."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: str | None
    attention_bias: bool = False
    sliding_window: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict, args: EngineArgs | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("the model config names no architecture")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else
                                          [int(e) for e in eos])
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # Newer HF configs keep both in one "rope_parameters" dict.
        rope_params = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        rope_theta = float(rope_theta)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if args is not None and args.rope_scaling is not None:
            rope_scaling = args.rope_scaling
        if args is not None and args.rope_theta is not None:
            rope_theta = float(args.rope_theta)
        return cls(
            architecture=archs[0],
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window"),
            raw=cfg,
        )

    def attention_window(self) -> int:
        """The attention window of every layer, -1 for none (only Mistral's is honoured)."""
        window = self.sliding_window if self.architecture == "MistralForCausalLM" else None
        return int(window) if window else -1

    def kv_bytes_per_block(self, block_size: int, dtype: str) -> int:
        """Bytes of one KV block across all layers, keys and values, in dtype (a name)."""
        return (2 * self.num_hidden_layers * block_size * self.num_key_value_heads *
                self.head_dim * _DTYPE_BYTES[dtype])
