"""The server's command line. Every flag of the specification is parsed. Precedence:
command line > --config YAML file > FASTLLM_<FLAG_NAME> environment variables > defaults.

The engine flags are generated from EngineArgs' fields (their help, choices and range types live
there); the server-only flags are written here. FLAGS classifies every flag: it acts (wired into EngineArgs or the server), it is unsupported (the
server exits naming it and why when it is set to anything but its default), or it is ignored (it
only tunes something fastllm does not have, e.g. CUDA graph capture sizes when running eager; the
server starts and logs one warning line naming it)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any

import yaml

from fastllm.config import (
    DEFAULT_MODEL,  # noqa: F401 - named in --help (through EngineArgs.model) and by the tests
    EngineArgs,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_int,
)

NOT_SUPPORTED = "not supported"

ACTS, UNSUPPORTED, IGNORED = "acts", "unsupported", "ignored"

_VISION = "vision inputs are not supported yet"
_ADAPTERS = "prompt adapters are not supported yet"
_HUB = "revisions select hub downloads; fastllm loads local paths only"
_GRAPHS = "fastllm has no CUDA graphs; every step runs eagerly"
_TRACES = "OpenTelemetry tracing is not supported yet"
_POOL = "tokenizer pools are not supported"

# Every flag (by dest) -> (class, why). An "acts" flag may still reject some values in
# check_supported (e.g. --guided-decoding-backend); an unsupported flag exits when it differs
# from its default; an ignored flag logs a warning when it differs from its default.
FLAGS: dict[str, tuple[str, str]] = {
    # server
    "config": (ACTS, ""),
    "host": (ACTS, ""),
    "port": (ACTS, ""),
    "shutdown_timeout": (ACTS, ""),
    "uvicorn_log_level": (ACTS, ""),
    "allow_credentials": (ACTS, ""),
    "allowed_origins": (ACTS, ""),
    "allowed_methods": (ACTS, ""),
    "allowed_headers": (ACTS, ""),
    "api_key": (ACTS, ""),
    "served_model_name": (ACTS, ""),
    "lora_modules": (ACTS, ""),
    "prompt_adapters": (UNSUPPORTED, _ADAPTERS),
    "chat_template": (ACTS, ""),
    "response_role": (ACTS, ""),
    "ssl_keyfile": (ACTS, ""),
    "ssl_certfile": (ACTS, ""),
    "ssl_ca_certs": (ACTS, ""),
    "ssl_cert_reqs": (ACTS, ""),
    "root_path": (ACTS, ""),
    "middleware": (ACTS, ""),
    "return_tokens_as_token_ids": (ACTS, ""),
    "disable_frontend_multiprocessing": (
        IGNORED, "the HTTP front end always runs in the engine's process"),
    "enable_auto_tool_choice": (ACTS, ""),
    "tool_call_parser": (ACTS, ""),
    "disable_log_requests": (ACTS, ""),
    "max_log_len": (ACTS, ""),
    "disable_log_stats": (ACTS, ""),
    # model and loading
    "model": (ACTS, ""),
    "tokenizer": (ACTS, ""),
    "skip_tokenizer_init": (UNSUPPORTED, "running without a tokenizer is not supported"),
    "revision": (UNSUPPORTED, _HUB),
    "code_revision": (UNSUPPORTED, _HUB),
    "tokenizer_revision": (UNSUPPORTED, _HUB),
    "tokenizer_mode": (UNSUPPORTED, "only the fast tokenizer exists"),
    "trust_remote_code": (UNSUPPORTED, "fastllm runs only its own model definitions"),
    "download_dir": (UNSUPPORTED, "fastllm downloads nothing; pass a local path"),
    "load_format": (ACTS, ""),
    "config_format": (ACTS, ""),
    "quantized_weights": (ACTS, ""),
    "dtype": (ACTS, ""),
    "kv_cache_dtype": (ACTS, ""),
    "quantization_param_path": (ACTS, ""),
    "max_model_len": (ACTS, ""),
    "guided_decoding_backend": (ACTS, ""),
    "distributed_executor_backend": (ACTS, ""),
    "worker_use_ray": (ACTS, ""),
    "engine_use_ray": (ACTS, ""),
    "ray_workers_use_nsight": (UNSUPPORTED, "Nsight profiling of Ray workers is not supported"),
    "pipeline_parallel_size": (ACTS, ""),
    "tensor_parallel_size": (ACTS, ""),
    "data_parallel_size": (ACTS, ""),
    "max_parallel_loading_workers": (
        IGNORED, "one process loads the whole model; there are no loading workers"),
    "model_loader_extra_config": (UNSUPPORTED, "loader extra configs are not supported"),
    "ignore_patterns": (IGNORED, "fastllm reads only the weight files its loader knows"),
    "quantization": (ACTS, ""),
    "rope_scaling": (ACTS, ""),
    "rope_theta": (ACTS, ""),
    "override_neuron_config": (UNSUPPORTED, "Neuron devices are not supported"),
    # cache and scheduling
    "block_size": (ACTS, ""),
    "enable_prefix_caching": (ACTS, ""),
    "prefix_caching_hash_algo": (ACTS, ""),
    "disable_sliding_window": (
        UNSUPPORTED, "a sliding-window model always runs with its window"),
    "use_v2_block_manager": (IGNORED, "fastllm has one block manager"),
    "num_lookahead_slots": (ACTS, ""),
    "seed": (ACTS, ""),
    "swap_space": (ACTS, ""),
    "cpu_offload_gb": (UNSUPPORTED, "offloading weights to the CPU is not supported"),
    "gpu_memory_utilization": (ACTS, ""),
    "num_gpu_blocks_override": (ACTS, ""),
    "max_num_batched_tokens": (ACTS, ""),
    "max_num_seqs": (ACTS, ""),
    "max_logprobs": (ACTS, ""),
    "enforce_eager": (IGNORED, _GRAPHS),
    "max_context_len_to_capture": (IGNORED, _GRAPHS),
    "max_seq_len_to_capture": (IGNORED, _GRAPHS),
    "disable_custom_all_reduce": (
        IGNORED, "all-reduce always goes through torch.distributed (gloo / NCCL)"),
    "tokenizer_pool_size": (UNSUPPORTED, _POOL),
    "tokenizer_pool_type": (IGNORED, "it only matters with --tokenizer-pool-size > 0"),
    "tokenizer_pool_extra_config": (IGNORED, "it only matters with --tokenizer-pool-size > 0"),
    "limit_mm_per_prompt": (UNSUPPORTED, "multimodal inputs are not supported yet"),
    "device": (ACTS, ""),
    "num_scheduler_steps": (UNSUPPORTED, "multi-step scheduling is not supported"),
    "scheduler_delay_factor": (UNSUPPORTED, "scheduler delays are not supported"),
    "enable_chunked_prefill": (ACTS, ""),
    "preemption_mode": (ACTS, ""),
    "scheduling_policy": (ACTS, ""),
    "disable_async_output_proc": (
        IGNORED, "outputs are always processed on the server's event loop"),
    # LoRA and prompt adapters
    "enable_lora": (ACTS, ""),
    "max_loras": (ACTS, ""),
    "max_lora_rank": (ACTS, ""),
    "lora_extra_vocab_size": (ACTS, ""),
    "lora_dtype": (ACTS, ""),
    "long_lora_scaling_factors": (UNSUPPORTED, "long-context LoRA scaling is not supported"),
    "max_cpu_loras": (ACTS, ""),
    "fully_sharded_loras": (IGNORED, "one device: adapters are never sharded"),
    "qlora_adapter_name_or_path": (UNSUPPORTED, "QLoRA (bitsandbytes) bases are not supported"),
    "enable_prompt_adapter": (UNSUPPORTED, _ADAPTERS),
    "max_prompt_adapters": (UNSUPPORTED, _ADAPTERS),
    "max_prompt_adapter_token": (UNSUPPORTED, _ADAPTERS),
    # vision
    "image_input_type": (UNSUPPORTED, _VISION),
    "image_token_id": (UNSUPPORTED, _VISION),
    "image_input_shape": (UNSUPPORTED, _VISION),
    "image_feature_size": (UNSUPPORTED, _VISION),
    "image_processor": (UNSUPPORTED, _VISION),
    "image_processor_revision": (UNSUPPORTED, _VISION),
    "disable_image_processor": (UNSUPPORTED, _VISION),
    # speculative decoding
    "speculative_model": (ACTS, ""),
    "speculative_model_quantization": (
        UNSUPPORTED, "a draft model's quantization is read from its file"),
    "num_speculative_tokens": (ACTS, ""),
    "speculative_draft_tensor_parallel_size": (ACTS, ""),
    "speculative_max_model_len": (ACTS, ""),
    "speculative_disable_by_batch_size": (ACTS, ""),
    "ngram_prompt_lookup_max": (ACTS, ""),
    "ngram_prompt_lookup_min": (ACTS, ""),
    "spec_decoding_acceptance_method": (ACTS, ""),
    "typical_acceptance_sampler_posterior_threshold": (ACTS, ""),
    "typical_acceptance_sampler_posterior_alpha": (ACTS, ""),
    "disable_logprobs_during_spec_decoding": (
        IGNORED, "logprobs come with every verified token at no extra pass"),
    "speculative_config": (ACTS, ""),
    # tracing
    "otlp_traces_endpoint": (UNSUPPORTED, _TRACES),
    "collect_detailed_traces": (UNSUPPORTED, _TRACES),
}

# FASTLLM_PORT and FASTLLM_HOST are not read as flag values: the specification's VLLM_PORT and
# VLLM_HOST_IP mean internal distributed communication, not the HTTP server's address.
_ENV_EXCLUDED = {"port", "host"}


def str_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _OptionalBool(argparse.Action):
    """--flag, --flag true|false, --no-flag (the specification writes
    --enable-chunked-prefill [ENABLE_CHUNKED_PREFILL])."""

    def __init__(self, option_strings, dest, default=None, help=None, **_):
        names = list(option_strings)
        names += ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
        super().__init__(names, dest, nargs="?", default=default, help=help,
                         metavar="true|false")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            setattr(namespace, self.dest, True if values is None else str_bool(values))


class _Parser(argparse.ArgumentParser):
    """Errors are one line (no usage block); an unknown flag names its closest match."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            rest = message[len("unrecognized arguments: "):].split()
            flag = next((w for w in rest if w.startswith("-")), None)
            if flag is None:
                message = f"unexpected argument {rest[0]!r}"
            else:
                flag = flag.split("=", 1)[0]
                known = [s for a in self._actions for s in a.option_strings]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
                message = f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close
                                                   else " (see fastllm-serve --help)")
        self.exit(2, f"{self.prog}: {message}\n")


_ACTIONS = {"store_true": "store_true", "boolean_optional": argparse.BooleanOptionalAction,
            "optional_bool": _OptionalBool}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--field-name for every flag field of EngineArgs: its default, help, choices, range type,
    action, nargs and extra spellings come from the field's definition."""
    for f in EngineArgs.flag_fields():
        meta = f.metadata
        kwargs: dict[str, Any] = {"default": f.default, "help": meta["help"]}
        if meta["action"] is not None:
            kwargs["action"] = _ACTIONS[meta["action"]]
        else:
            for key in ("type", "choices", "nargs"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        parser.add_argument("--" + f.name.replace("_", "-"), *meta["names"], **kwargs)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastllm-serve", allow_abbrev=False,
                description="fastllm OpenAI-compatible RESTful API server. Every flag can also "
                            "come from --config or FASTLLM_<FLAG> (except FASTLLM_HOST / "
                            "FASTLLM_PORT).")
    a = p.add_argument
    a("model_tag", nargs="?", default=None, help="model path (same as --model)")
    a("--config", default=None, help="YAML file of flag values (keys as flag names)")
    # server
    a("--host", default=None, help="address to listen on (default: all interfaces)")
    a("--port", type=port_number, default=8000,
      help="port to listen on, 1..65535 (0: any free port, printed at startup)")
    a("--shutdown-timeout", type=non_negative_float, default=5.0,
      help="seconds in-flight requests may run on after SIGINT/SIGTERM before they are aborted")
    a("--uvicorn-log-level", default="info",
      choices=["debug", "info", "warning", "error", "critical", "trace"],
      help="uvicorn's log level")
    a("--allow-credentials", action="store_true", default=False, help="CORS: allow credentials")
    a("--allowed-origins", type=json.loads, default=["*"], help="CORS: allowed origins (JSON)")
    a("--allowed-methods", type=json.loads, default=["*"], help="CORS: allowed methods (JSON)")
    a("--allowed-headers", type=json.loads, default=["*"], help="CORS: allowed headers (JSON)")
    a("--api-key", default=None, help="require this key in the Authorization header")
    a("--lora-modules", nargs="+", default=None,
      help="LoRA adapters to serve: name=path or JSON {\"name\", \"path\", \"base_model_name\"}")
    a("--prompt-adapters", nargs="+", default=None,
      help="prompt adapters as name=path (unsupported)")
    a("--chat-template", default=None, help="file path or inline jinja template")
    a("--response-role", default="assistant", help="role of chat replies")
    a("--ssl-keyfile", default=None, help="TLS private key file")
    a("--ssl-certfile", default=None, help="TLS certificate file (serves https)")
    a("--ssl-ca-certs", default=None, help="CA certificates for client verification")
    a("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2],
      help="client certificates: 0 none, 1 optional, 2 required (ssl.CERT_*)")
    a("--root-path", default=None, help="path prefix when behind a path-routing proxy")
    a("--middleware", action="append", default=[],
      help="import path of an ASGI middleware class or async function (repeatable)")
    a("--return-tokens-as-token-ids", action="store_true", default=False,
      help="logprobs name tokens as 'token_id:<id>' (default of the request parameter)")
    a("--disable-frontend-multiprocessing", action="store_true", default=False,
      help="ignored: the front end always runs in the engine's process")
    a("--disable-log-requests", action="store_true", default=False,
      help="do not log each request")
    a("--max-log-len", type=non_negative_int, default=None,
      help="prompt tokens shown per logged request (default: all)")
    a("--disable-log-stats", action="store_true", default=False,
      help="do not log throughput and cache statistics")
    # engine: one flag per EngineArgs field, from its definition
    _add_engine_flags(p)
    # model and loading flags that are not engine arguments
    a("--skip-tokenizer-init", action="store_true", default=False, help="unsupported")
    a("--revision", default=None, help="hub revision (unsupported: local paths only)")
    a("--code-revision", default=None, help="hub code revision (unsupported)")
    a("--tokenizer-revision", default=None, help="hub tokenizer revision (unsupported)")
    a("--tokenizer-mode", default="auto", choices=["auto", "slow", "mistral"],
      help="auto: the fast tokenizer (the only one)")
    a("--download-dir", default=None, help="unsupported: fastllm downloads nothing")
    a("--config-format", default="auto", choices=["auto", "hf", "mistral"],
      help="model config format: auto/hf (config.json or GGUF metadata)")
    a("--guided-decoding-backend", default="guidance",
      help="default guided decoding backend: guidance (llguidance; also 'auto') or xgrammar")
    a("--enable-auto-tool-choice", action="store_true", default=False,
      help="let the model choose tool calls itself; needs --tool-call-parser")
    a("--tool-call-parser", default=None, choices=["hermes", "mistral"],
      help="how model output is parsed into tool calls for tool_choice='auto'")
    a("--max-parallel-loading-workers", type=positive_int, default=None, help="ignored")
    a("--ray-workers-use-nsight", action="store_true", default=False, help="unsupported")
    a("--disable-sliding-window", action="store_true", default=False, help="unsupported")
    a("--use-v2-block-manager", action="store_true", default=False, help="ignored")
    a("--cpu-offload-gb", type=non_negative_float, default=0.0, help="unsupported unless 0")
    a("--enforce-eager", action="store_true", default=False,
      help="ignored: fastllm always runs eagerly")
    a("--max-context-len-to-capture", type=positive_int, default=8192, help="ignored")
    a("--max-seq-len-to-capture", type=positive_int, default=8192, help="ignored")
    a("--disable-custom-all-reduce", action="store_true", default=False, help="ignored")
    a("--tokenizer-pool-size", type=non_negative_int, default=0, help="unsupported unless 0")
    a("--tokenizer-pool-type", default="ray", help="ignored")
    a("--tokenizer-pool-extra-config", default=None, help="ignored")
    a("--limit-mm-per-prompt", default=None, help="unsupported: no multimodal inputs")
    a("--qlora-adapter-name-or-path", default=None, help="unsupported (LoRA)")
    a("--enable-prompt-adapter", action="store_true", default=False, help="unsupported")
    a("--max-prompt-adapters", type=positive_int, default=1, help="unsupported")
    a("--max-prompt-adapter-token", type=non_negative_int, default=0, help="unsupported")
    a("--num-scheduler-steps", type=positive_int, default=1, help="unsupported unless 1")
    a("--image-input-type", default=None, choices=["pixel_values", "image_features"],
      help="unsupported (vision)")
    a("--image-token-id", type=non_negative_int, default=None, help="unsupported (vision)")
    a("--image-input-shape", default=None, help="unsupported (vision)")
    a("--image-feature-size", type=positive_int, default=None, help="unsupported (vision)")
    a("--image-processor", default=None, help="unsupported (vision)")
    a("--image-processor-revision", default=None, help="unsupported (vision)")
    a("--disable-image-processor", action="store_true", default=False,
      help="unsupported (vision)")
    a("--scheduler-delay-factor", type=non_negative_float, default=0.0,
      help="unsupported unless 0")
    a("--speculative-model-quantization", default=None,
      help="unsupported: a draft model's quantization is read from its file")
    a("--model-loader-extra-config", default=None, help="unsupported")
    a("--ignore-patterns", action="append", default=[], help="ignored")
    a("--otlp-traces-endpoint", default=None, help="unsupported (tracing)")
    a("--collect-detailed-traces", default=None, help="unsupported (tracing)")
    a("--disable-async-output-proc", action="store_true", default=False, help="ignored")
    a("--override-neuron-config", default=None, help="unsupported (Neuron)")
    return p


def _env_value(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction,
                           _OptionalBool)):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return raw.split()
    return action.type(raw) if action.type else raw


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A --config value gets the command line's checks: ranges and choices."""
    if value is not None and getattr(action.type, "ranged", False):
        value = action.type(value)
    if value is not None and action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


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
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
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
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("help", "config", "model_tag"):
            parser.error(f"--config {path}: unknown flag {key!r}")
        try:
            out[dest] = _config_value(actions[dest], value)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--config {path}: {key}: {e}")
    return out


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def ignored_flag_warnings(ns: argparse.Namespace) -> list[str]:
    """One line per ignored flag that was set (logged at startup)."""
    defaults = {a.dest: a.default for a in make_parser()._actions}
    return [f"{_flag(dest)} is ignored: {why}" for dest, (kind, why) in FLAGS.items()
            if kind == IGNORED and getattr(ns, dest) != defaults[dest]]


def check_supported(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    defaults = {a.dest: a.default for a in parser._actions}
    for dest, (kind, why) in FLAGS.items():
        value = getattr(ns, dest)
        if kind == UNSUPPORTED and value != defaults[dest]:
            parser.error(f"{_flag(dest)}={value!r}: {why}")
    from fastllm.guided.params import backend_installed, normalize_backend

    try:
        backend = normalize_backend(ns.guided_decoding_backend) or "guidance"
    except ValueError as e:
        parser.error(f"--guided-decoding-backend: {e}")
    if not backend_installed(backend):
        parser.error(f"--guided-decoding-backend {ns.guided_decoding_backend}: the backend is "
                     f"not installed (pip install 'fastllm[{backend}]')")
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (hermes or mistral)")
    if ns.device not in ("auto", "cuda", "cpu"):
        parser.error(f"--device {ns.device}: only auto, cuda and cpu devices are supported")
    if ns.load_format not in ("auto", "pt", "safetensors", "gguf", "dummy"):
        parser.error(f"--load-format {ns.load_format}: {NOT_SUPPORTED} (auto, pt, safetensors, "
                     f"gguf or dummy)")
    if ns.config_format == "mistral":
        parser.error("--config-format mistral: Mistral-format configs are not supported "
                     "(auto or hf)")
    try:
        EngineArgs.from_namespace(ns)._validate_parallel()
    except ValueError as e:
        parser.error(str(e))
