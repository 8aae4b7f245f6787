"""The server's command line. Every flag of the specification is parsed. Precedence:
command line > --config YAML file > FASTLLM_<FLAG_NAME> environment variables > defaults.

Flags whose feature fastllm does not have make the server exit with a message naming them; flags
that only tune something fastllm does not do (e.g. CUDA graph capture sizes when running eager)
are accepted because their intent is already met."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import yaml

NOT_SUPPORTED = "not supported"

# flag dest -> (value that means "off", why it cannot be honoured)
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "lora_modules": (None, "LoRA adapters are not supported yet"),
    "enable_lora": (False, "LoRA adapters are not supported yet"),
    "speculative_model": (None, "speculative decoding is not supported yet"),
    "num_speculative_tokens": (None, "speculative decoding is not supported yet"),
    "speculative_max_model_len": (None, "speculative decoding is not supported yet"),
    "quantization_param_path": (None, "an fp8 KV cache is not wired into the engine yet"),
    "quantization": (None, "quantized weight formats other than GGUF are not supported yet"),
    "worker_use_ray": (False, "Ray workers are not supported"),
    "engine_use_ray": (False, "Ray engines are not supported"),
    "ray_workers_use_nsight": (False, "Ray workers are not supported"),
    "tokenizer_pool_size": (0, "tokenizer pools are not supported"),
    "skip_tokenizer_init": (False, "running without a tokenizer is not supported"),
    "revision": (None, "revisions select hub downloads; fastllm loads local paths only"),
    "code_revision": (None, "revisions select hub downloads; fastllm loads local paths only"),
    "tokenizer_revision": (None, "revisions select hub downloads; fastllm loads local paths only"),
    "download_dir": (None, "fastllm downloads nothing; pass a local path"),
    "trust_remote_code": (False, "fastllm runs only its own model definitions"),
    "image_input_type": (None, "vision inputs are not supported yet"),
    "image_token_id": (None, "vision inputs are not supported yet"),
    "image_input_shape": (None, "vision inputs are not supported yet"),
    "image_feature_size": (None, "vision inputs are not supported yet"),
    "scheduler_delay_factor": (0.0, "scheduler delays are not supported"),
    "num_lookahead_slots": (0, "lookahead slots (speculative decoding) are not supported"),
    "model_loader_extra_config": (None, "loader extra configs are not supported"),
    "tokenizer_mode": ("auto", "only the fast tokenizer exists"),
}

# Environment variables of the specification whose meaning differs from the flag of that name.
_ENV_EXCLUDED = {"port", "host"}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastllm-serve",
                                description="fastllm OpenAI-compatible RESTful API server.")
    a = p.add_argument
    a("model_tag", nargs="?", default=None, help="model path (same as --model)")
    a("--config", default=None, help="YAML file of flag values (keys as flag names)")
    # server
    a("--host", default=None, help="host name")
    a("--port", type=int, default=8000, help="port number")
    a("--uvicorn-log-level", default="info",
      choices=["debug", "info", "warning", "error", "critical", "trace"])
    a("--allow-credentials", action="store_true", default=False)
    a("--allowed-origins", type=json.loads, default=["*"])
    a("--allowed-methods", type=json.loads, default=["*"])
    a("--allowed-headers", type=json.loads, default=["*"])
    a("--api-key", default=None, help="require this key in the Authorization header")
    a("--served-model-name", nargs="+", default=None)
    a("--lora-modules", nargs="+", default=None)
    a("--chat-template", default=None, help="file path or inline jinja template")
    a("--response-role", default="assistant")
    a("--ssl-keyfile", default=None)
    a("--ssl-certfile", default=None)
    a("--ssl-ca-certs", default=None)
    a("--ssl-cert-reqs", type=int, default=0)
    a("--root-path", default=None)
    a("--middleware", action="append", default=[])
    a("--disable-log-requests", action="store_true", default=False)
    a("--max-log-len", type=int, default=None)
    a("--disable-log-stats", action="store_true", default=False)
    # model and engine
    a("--model", default=None, help="local model directory or .gguf (default: SmolLM2-135M)")
    a("--tokenizer", default=None)
    a("--skip-tokenizer-init", action="store_true", default=False)
    a("--revision", default=None)
    a("--code-revision", default=None)
    a("--tokenizer-revision", default=None)
    a("--tokenizer-mode", default="auto", choices=["auto", "slow"])
    a("--trust-remote-code", action="store_true", default=False)
    a("--download-dir", default=None)
    a("--load-format", default="auto",
      choices=["auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "gguf"])
    a("--quantized-weights", default="auto", choices=["auto", "dequantize"],
      help="auto: keep a GGUF model's quantized linear layers quantized on the CPU")
    a("--dtype", default="auto",
      choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    a("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "float32", "float16", "bfloat16"],
      help="KV cache storage dtype; auto = the model dtype (float16 for a GGUF kept quantized on "
           "the CPU). fp8 is not wired into the engine yet.")
    a("--quantization-param-path", default=None)
    a("--max-model-len", type=int, default=None)
    a("--guided-decoding-backend", default="guidance",
      help="default guided decoding backend: guidance (llguidance; also 'auto') or xgrammar "
           "(optional extra); requests may override it with guided_decoding_backend")
    a("--enable-auto-tool-choice", action="store_true", default=False,
      help="let the model choose tool calls itself (tool_choice='auto'); needs "
           "--tool-call-parser")
    a("--tool-call-parser", default=None, choices=["hermes", "mistral"],
      help="how model output is parsed into tool calls for tool_choice='auto'")
    a("--worker-use-ray", action="store_true", default=False)
    a("--pipeline-parallel-size", "-pp", type=int, default=1)
    a("--tensor-parallel-size", "-tp", type=int, default=1)
    a("--max-parallel-loading-workers", type=int, default=None)
    a("--ray-workers-use-nsight", action="store_true", default=False)
    a("--block-size", type=int, default=None, choices=[8, 16, 32],
      help="tokens per KV block (default: 16 on a GPU, 8 on a CPU)")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    a("--prefix-caching-hash-algo", default="sha256", choices=["sha256", "fast"],
      help="prefix-cache block digest: sha256, or fast (SipHash-128, random per-process key)")
    a("--use-v2-block-manager", action="store_true", default=False)
    a("--num-lookahead-slots", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--swap-space", type=float, default=4.0)
    a("--gpu-memory-utilization", type=float, default=0.9)
    a("--num-gpu-blocks-override", type=int, default=None)
    a("--max-num-batched-tokens", type=int, default=None)
    a("--max-num-seqs", type=int, default=256)
    a("--max-logprobs", type=int, default=20)
    a("--quantization", "-q", default=None)
    a("--enforce-eager", action="store_true", default=False)
    a("--max-context-len-to-capture", type=int, default=8192)
    a("--disable-custom-all-reduce", action="store_true", default=False)
    a("--tokenizer-pool-size", type=int, default=0)
    a("--tokenizer-pool-type", default="ray")
    a("--tokenizer-pool-extra-config", default=None)
    a("--enable-lora", action="store_true", default=False)
    a("--max-loras", type=int, default=1)
    a("--max-lora-rank", type=int, default=16)
    a("--lora-extra-vocab-size", type=int, default=256)
    a("--lora-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    a("--max-cpu-loras", type=int, default=None)
    a("--device", default="auto", choices=["auto", "cuda", "neuron", "cpu"])
    a("--image-input-type", default=None, choices=["pixel_values", "image_features"])
    a("--image-token-id", type=int, default=None)
    a("--image-input-shape", default=None)
    a("--image-feature-size", type=int, default=None)
    a("--scheduler-delay-factor", type=float, default=0.0)
    a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    a("--speculative-model", default=None)
    a("--num-speculative-tokens", type=int, default=None)
    a("--speculative-max-model-len", type=int, default=None)
    a("--model-loader-extra-config", default=None)
    a("--engine-use-ray", action="store_true", default=False)
    a("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    a("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    a("--rope-scaling", type=json.loads, default=None)
    a("--rope-theta", type=float, default=None)
    return p


def _env_value(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if action.nargs in ("+", "*"):
        return raw.split()
    return action.type(raw) if action.type else raw


def parse_args(argv: list[str] | None = None,
               environ: dict[str, str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    environ = dict(os.environ) if environ is None else environ
    explicit = parser.parse_args(argv)
    # Which dests were given on the command line: parse again with every default suppressed.
    given = _given_dests(parser, argv)
    values = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    for action in parser._actions:
        if action.dest in ("help", "model_tag", "config") or action.dest in _ENV_EXCLUDED:
            continue
        raw = environ.get("FASTLLM_" + action.dest.upper())
        if raw is not None and raw != "":
            try:
                values[action.dest] = _env_value(action, raw)
            except (ValueError, json.JSONDecodeError) as e:
                parser.error(f"FASTLLM_{action.dest.upper()}={raw!r}: {e}")
    if environ.get("FASTLLM_API_KEY") and "api_key" not in given:
        values["api_key"] = environ["FASTLLM_API_KEY"]
    config_path = explicit.config
    if config_path:
        values.update(_read_config(parser, config_path))
    for dest in given:
        values[dest] = getattr(explicit, dest)
    if explicit.model_tag is not None:
        if "model" in given and explicit.model != explicit.model_tag:
            parser.error("the model is given twice, as a positional argument and as --model")
        values["model"] = explicit.model_tag
    values.pop("model_tag", None)
    values["config"] = config_path
    ns = argparse.Namespace(**values)
    check_supported(parser, ns)
    return ns


def _given_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
        if isinstance(action, argparse._StoreTrueAction):
            kwargs["action"] = "store_true"
        elif isinstance(action, argparse.BooleanOptionalAction):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(action, argparse._AppendAction):
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = action.nargs
        probe.add_argument(*action.option_strings, **kwargs)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests or dest in ("help", "config", "model_tag"):
            parser.error(f"--config {path}: unknown flag {key!r}")
        out[dest] = value
    return out


def check_supported(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.kv_cache_dtype == "fp8":
        parser.error("--kv-cache-dtype='fp8': an fp8 KV cache is not wired into the engine yet")
    for dest, (off, why) in _UNSUPPORTED.items():
        value = getattr(ns, dest)
        if value != off:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag}={value!r}: {why}")
    from fastllm.guided.backends import backend_installed
    from fastllm.guided.params import normalize_backend

    try:
        backend = normalize_backend(ns.guided_decoding_backend) or "guidance"
    except ValueError as e:
        parser.error(f"--guided-decoding-backend: {e}")
    if not backend_installed(backend):
        parser.error(f"--guided-decoding-backend {ns.guided_decoding_backend}: the backend is "
                     f"not installed (pip install 'fastllm[{backend}]')")
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (hermes or mistral)")
    if ns.device == "neuron":
        parser.error("--device neuron: Neuron devices are not supported")
    if ns.load_format in ("npcache", "tensorizer"):
        parser.error(f"--load-format {ns.load_format}: {NOT_SUPPORTED}")
    if ns.tensor_parallel_size != 1 or ns.pipeline_parallel_size != 1:
        parser.error("--tensor-parallel-size/--pipeline-parallel-size > 1: parallelism is not "
                     "supported yet")
