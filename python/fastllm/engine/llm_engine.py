"""LLMEngine: builds the model, its executor and the native engine from EngineArgs, and turns
native token outputs into text outputs. Synchronous; the offline LLM API drives it."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import time

import numpy as np

from fastllm import _C
from fastllm.config import FP8_KV_CACHE_DTYPES, EngineArgs, ModelConfig
from fastllm.engine.beam_search import (
    Beam,
    BeamSearchParams,
    check_beam_search,
    expansion_params,
    run_beam_search,
    top_logprobs_of,
)
from fastllm.engine.errors import RequestFailedError
from fastllm.engine.output_processor import OutputProcessor
from fastllm.guided import GuidedDecodingManager
from fastllm.loader import load_config, resolve_model
from fastllm.loader.hf_quant import kv_cache_scales
from fastllm.loader.quantization import detect_quantization
from fastllm.models import load_checkpoint, model_spec, native_cpu_architectures
from fastllm.models.cpu_model import load_cpu_model
from fastllm.models.registry import NATIVE_CPU
from fastllm.outputs import RequestOutput
from fastllm.sampling_params import SamplingParams
from fastllm.tokenizer import load_tokenizer
from fastllm.torch_extra import require_torch
from fastllm.worker.cpu_runner import build_cpu_executor

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# KV memory the prefix cache may keep on the CPU beside the peak working set, however small that
# set is (the engine's BlockPool otherwise gives cached blocks room as large as the working set:
# one stream's blocks left room for one earlier request, so requests that repeat a prompt after
# a few others recomputed it). CPU KV blocks become resident as they are first used; on a GPU
# the pool is allocated whole and every free block may stay cached.
CPU_PREFIX_CACHE_FLOOR_BYTES = 32 << 20


@functools.cache
def _libc():
    # The process's own symbols (libc among them): no library search, which spawns ldconfig.
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_free_memory() -> None:
    """Returns the C heap's free pages to the OS (glibc's malloc_trim): loading leaves tens of MB
    of freed parse buffers and temporaries resident otherwise. A no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def serve_large_allocations_from_mmap(threshold: int = 128 << 10) -> None:
    """For a long-running server: allocations of threshold bytes or more (a step's logits and
    activations) always come from mmap and go back to the OS when freed. glibc otherwise raises
    its mmap threshold after the first large free and serves them from the heap, whose freed
    middle stays resident (10-15 MB more at 16 concurrent requests on the default model)."""
    libc = _libc()
    m_mmap_threshold, m_arena_max = -3, -8
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(m_mmap_threshold, threshold)
        # Two heaps, not eight per core: each thread's arena keeps its own freed memory.
        libc.mallopt(m_arena_max, 2)


def _set_kv_scales(model, scales: list[tuple[float, float]] | None) -> None:
    """Gives each attention layer of a torch model its fp8 KV cache scales."""
    if scales is None:
        return
    from fastllm.models.attention import PagedAttention

    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    if len(layers) != len(scales):
        raise ValueError(f"{len(scales)} KV cache scales for {len(layers)} attention layers")
    for layer, (k_scale, v_scale) in zip(layers, scales):
        layer.k_scale, layer.v_scale = float(k_scale), float(v_scale)


class EngineCore:
    """The model, its executor and the native engine (``native``, a ``_C.Engine``), built from
    EngineArgs. Front ends (LLMEngine for offline use, AsyncLLM for the server) drive it.

    Two executors: the torch model (``worker.model_runner``), and for a quantized GGUF model that
    the native CPU decoder runs whole (``models.cpu_model``) a torch-free one (``worker.cpu_runner``)
    that gives the same tokens and logprobs without torch's ~200 MB in the process. The latter
    runs wherever it applies unless ``torch_free`` is False (None: unless the environment sets
    FASTLLM_TORCH_FREE=0); torch is imported only when the torch model runs."""

    def __init__(self, args: EngineArgs, torch_free: bool | None = None, on_dead=None):
        """on_dead(message): called (from another thread) when the model's distributed workers
        stop (one died or failed); the engine's steps fail from then on."""
        args.validate()
        if args.data_parallel_size > 1 or args.engine_use_ray:
            raise ValueError("data_parallel_size > 1 and engine_use_ray place engine replicas "
                             "behind a server (fastllm-serve); this is one engine")
        t0 = time.perf_counter()
        self.args = args
        source = resolve_model(args.model, args.load_format)
        hf_config = load_config(source)
        self.source = dataclasses.replace(
            source, quant=detect_quantization(source, hf_config, args.quantization))
        self.source_name = args.model or DEFAULT_MODEL_NAME
        self.model_config = ModelConfig.from_dict(hf_config, args)
        mc = self.model_config
        spec = model_spec(mc.architecture)  # ValueError naming the supported architectures
        self.device = args.resolve_device()  # "cpu" | "cuda"
        dtype = args.resolve_dtype(mc.torch_dtype, self.device)
        self.block_size = args.resolve_block_size(self.device)
        self.tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else self.source)
        release_free_memory()  # the tokenizer's parse buffers

        self.max_model_len = args.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings and not mc.rope_scaling:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {mc.max_position_embeddings} without rope scaling")
        from fastllm.distributed.executor import uses_distributed_executor

        distributed = uses_distributed_executor(args)
        if distributed and self.source.quant is not None:
            raise ValueError(f"{self.source.quant.method} checkpoints do not run with tensor/"
                             "pipeline parallelism yet (workers split float weights)")
        # Workers split float weights: a GGUF model is dequantized on them.
        quantized = not distributed and args.use_quantized_weights(self.source, self.device)
        kv_dtype = args.resolve_kv_cache_dtype(dtype, quantized and self.device == "cpu")
        if distributed and kv_dtype in FP8_KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {args.kv_cache_dtype!r} does not run with tensor/"
                             "pipeline parallelism yet")
        self.kv_scales = (kv_cache_scales(self.source, mc.num_hidden_layers,
                                          args.quantization_param_path)
                          if kv_dtype in FP8_KV_CACHE_DTYPES else None)
        if torch_free is None:
            torch_free = os.environ.get("FASTLLM_TORCH_FREE", "1") != "0"
        cpu_model = (load_cpu_model(mc, self.source, dtype, kv_dtype, self.kv_scales)
                     if torch_free and quantized and self.device == "cpu" else None)
        if distributed:
            require_torch(f"tensor/pipeline parallelism or the Ray executor ({self.source_name})")
            num_gpu_blocks, num_cpu_blocks = self._build_distributed_executor(dtype, kv_dtype,
                                                                              on_dead)
        elif cpu_model is not None:
            # dtypes as numpy's objects here (an fp8 cache's codes as uint8), as torch's on the
            # torch path
            self.model, self.dtype = cpu_model, np.dtype(dtype)
            self.kv_dtype = np.dtype(np.uint8 if kv_dtype in FP8_KV_CACHE_DTYPES else kv_dtype)
            release_free_memory()  # the loader's temporaries
            num_gpu_blocks, num_cpu_blocks = self._plan_kv_cache(kv_dtype)
            self.executor = build_cpu_executor(cpu_model, kv_dtype, self.block_size,
                                               num_gpu_blocks, num_cpu_blocks)
        else:
            require_torch(self._torch_path_reason(quantized, torch_free))
            if self.device == "cpu" and NATIVE_CPU not in spec.executors:
                logger.info("%s runs on the torch executor: the native CPU decoder covers %s",
                            mc.architecture, ", ".join(sorted(native_cpu_architectures())))
            num_gpu_blocks, num_cpu_blocks = self._build_torch_executor(quantized, dtype,
                                                                        kv_dtype)

        cfg = _C.EngineConfig()
        cfg.cache.num_gpu_blocks = num_gpu_blocks
        cfg.cache.num_cpu_blocks = num_cpu_blocks
        cfg.cache.block_size = self.block_size
        cfg.cache.enable_prefix_caching = args.enable_prefix_caching
        cfg.cache.min_cached_blocks = (
            CPU_PREFIX_CACHE_FLOOR_BYTES // mc.kv_bytes_per_block(self.block_size, kv_dtype)
            if self.device == "cpu" else num_gpu_blocks)
        cfg.cache.hash_algo = getattr(_C.PrefixHashAlgo, args.prefix_caching_hash_algo.upper())
        sched = cfg.scheduler
        sched.max_model_len = self.max_model_len
        sched.max_num_seqs = args.max_num_seqs
        sched.enable_chunked_prefill = args.enable_chunked_prefill
        if args.max_num_batched_tokens is not None:
            sched.max_num_batched_tokens = args.max_num_batched_tokens
        elif args.enable_chunked_prefill:
            # Small chunks keep decode steps flowing on a CPU; GPUs amortise larger ones.
            sched.max_num_batched_tokens = 512 if self.device == "cpu" else 2048
        else:
            sched.max_num_batched_tokens = self.max_model_len
        sched.policy = (_C.SchedulingPolicy.PRIORITY if args.scheduling_policy == "priority"
                        else _C.SchedulingPolicy.FCFS)
        sched.preemption_mode = (_C.PreemptionMode.SWAP if args.preemption_mode == "swap"
                                 else _C.PreemptionMode.RECOMPUTE)
        eos = set(mc.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        cfg.eos_token_ids = sorted(eos)
        cfg.vocab_size = mc.vocab_size
        cfg.max_logprobs = args.max_logprobs
        cfg.seed = args.seed
        self.speculative = args.speculative_settings()
        draft_executor = None
        if self.speculative is not None:
            if self.speculative.method == "draft_model":
                # The draft's cache gets as many blocks as the target's: a smaller model's
                # blocks are smaller, and it never holds more sequences than the target.
                draft_executor = self._build_draft_executor(torch_free, num_gpu_blocks)
            cfg.speculative = self.speculative.to_native(self.block_size, num_gpu_blocks)
        self.lora = None
        if args.enable_lora:
            from fastllm.lora.manager import LoraManager

            sched.max_loras = args.max_loras
            self.lora = LoraManager(mc, self.executor, args.max_loras,
                                    args.max_cpu_loras or args.max_loras, args.max_lora_rank,
                                    args.resolve_lora_dtype(quantized))
        self.engine_config = cfg
        self.native = _C.Engine(cfg, self.executor, draft_executor)
        self.num_gpu_blocks = num_gpu_blocks
        self.startup_seconds = time.perf_counter() - t0
        kind = ("torch-free" if cpu_model is not None else
                f"distributed ({args.tensor_parallel_size} x {args.pipeline_parallel_size} "
                f"{args.resolved_executor_backend()} workers)" if distributed else "torch")
        logger.info("fastllm engine ready in %.2f s: %s on %s (%s, %s executor), %d KV blocks of "
                    "%d tokens (%s)", self.startup_seconds, mc.architecture, self.device, dtype,
                    kind, num_gpu_blocks - 1, self.block_size, kv_dtype)
        if self.speculative is not None:
            logger.info("%s", self.speculative.describe())

    @property
    def dead(self) -> str | None:
        """Why the executor stopped for good (a distributed worker died), or None."""
        return getattr(self.executor, "dead", None)

    def shutdown(self) -> None:
        """Stops the executor's workers, if it has any (the native loop must be stopped)."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

    def acquire_lora(self, lora_request) -> int:
        """The adapter id a request runs with (0: none), its adapter loaded and held until
        release_lora."""
        if lora_request is None:
            return 0
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters (enable_lora)")
        return self.lora.acquire(lora_request)

    def release_lora(self, lora_id: int) -> None:
        if lora_id and self.lora is not None:
            self.lora.release(lora_id)

    def build_guided_manager(self, default_backend: str | None = None) -> GuidedDecodingManager:
        """A guided-decoding manager for this model, its hook installed on the executor (which
        has one logits-hook slot: call this once, from the front end that owns the core)."""
        manager = GuidedDecodingManager(self.tokenizer, self.model_config.vocab_size,
                                        list(self.engine_config.eos_token_ids), default_backend)
        self.executor.set_logits_hook(manager.hook)
        return manager

    # ---- construction ------------------------------------------------------------------------

    def _torch_path_reason(self, quantized: bool, torch_free: bool) -> str:
        """Why this model runs on the torch executor, for the error a missing torch gives."""
        model = f"model {self.source_name!r}"
        if self.device != "cpu":
            return f"{model} on device {self.device!r}"
        arch = self.model_config.architecture
        if arch not in native_cpu_architectures():
            return (f"{model} (architecture {arch}, which only the torch executor runs; the C++ "
                    f"CPU executor runs {', '.join(sorted(native_cpu_architectures()))})")
        if self.source.load_format == "dummy":
            return f"{model} with dummy weights"
        if not self.source.keeps_quantized:
            return f"{model} ({self.source.load_format} weights, not GGUF)"
        if not quantized:
            return f"{model} with float weights (--quantized-weights dequantize)"
        if not torch_free:
            return f"{model} with FASTLLM_TORCH_FREE=0"
        return (f"{model} ({arch}; the C++ CPU executor takes GGUF models of its architectures "
                "with float32 activations and a float16 or float32 KV cache)")

    def _build_torch_executor(self, quantized: bool, dtype: str, kv_dtype: str
                              ) -> tuple[int, int]:
        """Loads the torch model and its executor; returns the KV blocks (device, host)."""
        from fastllm.torch_extra import torch
        from fastllm.worker.model_runner import ModelExecutor

        device = torch.device(self.device)
        self.dtype, self.kv_dtype = getattr(torch, dtype), getattr(torch, kv_dtype)
        self.model = self._load_model(quantized, device)
        _set_kv_scales(self.model, self.kv_scales)
        release_free_memory()  # the loader's temporaries
        num_gpu_blocks, num_cpu_blocks = self._plan_kv_cache(kv_dtype)
        self.executor = ModelExecutor(self.model, self.model_config, device, self.kv_dtype,
                                      self.block_size, num_gpu_blocks, num_cpu_blocks,
                                      self.args.max_loras if self.args.enable_lora else 0)
        return num_gpu_blocks, num_cpu_blocks

    def _build_distributed_executor(self, dtype: str, kv_dtype: str, on_dead
                                    ) -> tuple[int, int]:
        """Starts the workers (each loads its share of the model) and the executor over them;
        returns the KV blocks (device, host) of the smallest worker."""
        from fastllm.distributed.executor import DistributedExecutor, start_workers
        from fastllm.models.parallel import check_parallel_config
        from fastllm.torch_extra import torch

        args = self.args
        check_parallel_config(self.model_config, args.tensor_parallel_size,
                              args.pipeline_parallel_size)
        self.dtype, self.kv_dtype = getattr(torch, dtype), getattr(torch, kv_dtype)
        self.model = None  # on the workers
        workers = start_workers(args, self.device, on_dead)
        try:
            blocks = min(b for b, _ in workers.kv_blocks)
            swap = min(s for _, s in workers.kv_blocks)
            self._check_kv_capacity(blocks)
            workers.call_all("init_cache", blocks, swap)
        except BaseException:
            workers.shutdown()
            raise
        self.executor = DistributedExecutor(workers)
        return blocks, swap

    def _load_model(self, quantized: bool, device, model_config: ModelConfig | None = None,
                    source=None, dtype=None):
        """The torch model of the target (by default) or of another source (the draft)."""
        from fastllm.loader import iterate_weights
        from fastllm.models import get_model_class
        from fastllm.models.quant_loader import load_quantized_model
        from fastllm.torch_extra import torch

        mc = model_config or self.model_config
        source = source or self.source
        dtype = dtype or self.dtype
        cls = get_model_class(mc)
        if quantized:
            return load_quantized_model(cls, mc, source, device, dtype).eval()
        with torch.device("meta"):
            model = cls(mc)
        model = model.to_empty(device=device).to(dtype)
        model.init_buffers(device)
        if self.args.load_format == "dummy":
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(
                    device=p.device).manual_seed(self.args.seed))
        else:
            load_checkpoint(model, iterate_weights(source, self.args.load_format, dtype))
        return model.eval()

    def _build_draft_executor(self, torch_free: bool, num_blocks: int):
        """The draft model's executor for speculative decoding: loaded as the target is (the
        torch-free CPU decoder for a quantized GGUF, else the torch model), with its own KV cache
        of num_blocks blocks. Its vocabulary must be the target's."""
        path = self.speculative.model
        source = resolve_model(path, "auto")
        hf_config = load_config(source)
        source = dataclasses.replace(source, quant=detect_quantization(source, hf_config, None))
        mc = ModelConfig.from_dict(hf_config)
        if mc.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"the draft model {path} has a vocabulary of {mc.vocab_size} tokens, "
                             f"the target {self.model_config.vocab_size}: speculative decoding "
                             "needs a draft that shares the target's tokenizer")
        probe = "Speculative decoding: the draft shares the tokenizer. 12345 ü 東京"
        draft_tok = load_tokenizer(source)
        if draft_tok.encode(probe, add_special_tokens=False) != self.tokenizer.encode(
                probe, add_special_tokens=False):
            raise ValueError(f"the draft model {path} tokenizes text differently from the "
                             "target: speculative decoding needs a shared tokenizer")
        args = self.args
        quantized = args.use_quantized_weights(source, self.device)
        dtype = args.resolve_dtype(mc.torch_dtype, self.device)
        kv_dtype = args.resolve_kv_cache_dtype(dtype, quantized and self.device == "cpu")
        # The draft's own checkpoint scales (a scales file describes the target's layers).
        scales = (kv_cache_scales(source, mc.num_hidden_layers)
                  if kv_dtype in FP8_KV_CACHE_DTYPES else None)
        cpu_model = (load_cpu_model(mc, source, dtype, kv_dtype, scales)
                     if torch_free and quantized and self.device == "cpu" else None)
        if cpu_model is not None:
            self.draft_model = cpu_model
            return build_cpu_executor(cpu_model, kv_dtype, self.block_size, num_blocks, 0)
        from fastllm.torch_extra import torch
        from fastllm.worker.model_runner import ModelExecutor

        device = torch.device(self.device)
        self.draft_model = self._load_model(quantized, device, mc, source, getattr(torch, dtype))
        _set_kv_scales(self.draft_model, scales)
        return ModelExecutor(self.draft_model, mc, device, getattr(torch, kv_dtype),
                             self.block_size, num_blocks, 0)

    def _plan_kv_cache(self, kv_dtype: str) -> tuple[int, int]:
        mc, args = self.model_config, self.args
        per_block = mc.kv_bytes_per_block(self.block_size, kv_dtype)
        if args.num_gpu_blocks_override is not None:
            blocks = int(args.num_gpu_blocks_override)
        elif self.device == "cpu":
            blocks = args.cpu_kv_bytes() // per_block
        else:
            from fastllm.torch_extra import torch

            free, total = torch.cuda.mem_get_info(torch.device(self.device))
            used_elsewhere = total - free
            budget = total * args.gpu_memory_utilization - used_elsewhere
            # Leave room for the activations of one full step.
            budget -= 4 * mc.hidden_size * 4096 * torch.empty((), dtype=self.dtype).element_size()
            blocks = int(budget // per_block)
        self._check_kv_capacity(blocks)
        swap = 0
        if self.device == "cuda" or args.preemption_mode == "swap":
            swap = int(args.swap_space * (1 << 30)) // per_block
        return blocks, swap

    def _check_kv_capacity(self, blocks: int) -> None:
        needed = -(-self.max_model_len // self.block_size) + 1
        if blocks < needed:
            raise ValueError(
                f"the KV cache has room for {max(blocks - 1, 0) * self.block_size} tokens, fewer "
                f"than max_model_len {self.max_model_len}: give it more memory "
                f"(FASTLLM_CPU_KVCACHE_SPACE / --gpu-memory-utilization) or lower max_model_len")

    # ---- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: PromptType, add_special_tokens: bool = True
                      ) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got "
                         f"{type(prompt).__name__}")


class LLMEngine:
    """Synchronous front end: add requests, call step() until done (the offline LLM API). The
    output processor is the one AsyncLLM uses."""

    def __init__(self, args: EngineArgs, torch_free: bool | None = None,
                 guided_decoding: bool = True):
        """guided_decoding=False builds no guided-decoding manager, which leaves the executor's
        one logits-hook slot to a caller's own hook (guided requests are then a ValueError)."""
        self.core = EngineCore(args, torch_free)
        self.args = args
        self.tokenizer = self.core.tokenizer
        self.guided = self.core.build_guided_manager() if guided_decoding else None
        self.processor = OutputProcessor(self.tokenizer, self._abort_in_core)
        self._counter = 0
        self._backlog: list[RequestOutput] = []  # finished in a step that raised
        self._lora_of: dict[str, int] = {}  # request id -> its adapter, held until it ends

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, add_special_tokens: bool = True,
                    lora_request=None) -> str:
        params = params or SamplingParams()
        params.validate(self.args.max_logprobs, self.core.model_config.vocab_size)
        compiled = None
        if params.guided_decoding is not None:
            if self.guided is None:
                raise ValueError("guided decoding is off for this engine "
                                 "(LLMEngine(guided_decoding=False))")
            compiled = self.guided.compile(params.guided_decoding)  # ValueError if invalid
        text, ids = self.core.encode_prompt(prompt, add_special_tokens)
        if params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens:
            text, ids = None, ids[-params.truncate_prompt_tokens:]
        if request_id is None:
            request_id = f"req-{self._counter}"
            self._counter += 1
        if request_id in self.processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        # ONE engine request, also for n / best_of: the engine computes the prompt once and
        # forks the children copy-on-write.
        lora_id = self.core.acquire_lora(lora_request)
        if compiled is not None:
            self.guided.register(request_id, compiled, params.num_samples)
        try:
            self.core.native.add_request(request_id, ids, params.to_native(fan_out=True),
                                         lora_id=lora_id)
        except BaseException:
            self._unregister_guided(request_id)
            self.core.release_lora(lora_id)
            raise
        self.processor.add_request(request_id, text, ids, params)
        if lora_id:
            self._lora_of[request_id] = lora_id
        return request_id

    def encode_prompt(self, prompt: PromptType, add_special_tokens: bool = True
                      ) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt string, token-id list or prompt dict."""
        return self.core.encode_prompt(prompt, add_special_tokens)

    def _unregister_guided(self, request_id: str) -> None:
        if self.guided is not None:
            self.guided.unregister(request_id)
        self.core.release_lora(self._lora_of.pop(request_id, 0))

    def _abort_in_core(self, request_id: str) -> None:
        self._unregister_guided(request_id)
        self.core.native.abort(request_id)

    def abort_request(self, request_id: str) -> bool:
        self.processor.remove(request_id)
        self._unregister_guided(request_id)
        return self.core.native.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(len(self.processor)) or bool(self._backlog)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it. A request the engine
        failed raises RequestFailedError (after the step's other outputs are applied; requests
        that finished beside it are returned by the next call)."""
        finished, self._backlog = self._backlog, []
        failures: list[RequestFailedError] = []
        for group, _ in self.processor.process(self.core.native.step()):
            if not group.finished:
                continue
            self._unregister_guided(group.request_id)
            if group.failed:
                logger.error("request %s failed: %s", group.request_id, group.error)
                failures.append(RequestFailedError(group.request_id, group.error))
                continue
            finished.append(group.to_output())
        if failures:
            self._backlog = finished
            raise failures[0]
        return finished

    def run_until_done(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        """Steps the engine until every one of request_ids finished."""
        wanted = set(request_ids)
        results: dict[str, RequestOutput] = {}
        while wanted - results.keys():
            if not self.has_unfinished_requests():
                missing = ", ".join(sorted(wanted - results.keys()))
                raise ValueError(f"no such running request(s): {missing}")
            for out in self.step():
                if out.request_id in wanted:
                    results[out.request_id] = out
        return results

    def beam_search(self, prompt_ids: list[int], params: BeamSearchParams) -> list[Beam]:
        """Beam search for one prompt (see fastllm.engine.beam_search)."""
        def expand(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
            ids = [self.add_request({"prompt_token_ids": seq}, expansion_params(k))
                   for seq in seqs]
            outs = self.run_until_done(ids)
            return [top_logprobs_of(outs[i].outputs[0].logprobs[0], k) for i in ids]

        check_beam_search(params, self.args.max_logprobs)
        eos = set(self.core.engine_config.eos_token_ids)
        return run_beam_search(prompt_ids, params, eos, expand)

    def stats(self):
        return self.core.native.stats()

    def shutdown(self) -> None:
        """Stops the executor's workers (distributed execution); a no-op otherwise."""
        self.core.shutdown()
