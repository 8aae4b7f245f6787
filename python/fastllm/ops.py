"""fastllm kernels as torch ops: the one route from torch code to the kernels.

Thin wrappers over ``fastllm.kernels`` (the native ``_C.ops`` functions), registered with
``torch.library`` (with fake implementations) so models that call them stay traceable by
``torch.compile``. Model code calls them through :func:`model_op`: the op's plain body when eager
(the dispatcher costs ~8 us a call), the registered op under ``torch.compile``.

How tensors cross into C++, zero-copy either way: CPU float32/float16 inputs as numpy views
(nanobind reads a numpy array through the buffer protocol in well under a microsecond, while
``torch.Tensor.__dlpack__`` costs ~3 us per tensor; a decode step makes ~10 calls with ~35 tensors
per layer, ~3 ms a step on a small model), everything else (CUDA, bfloat16) as DLPack views. CUDA
tensors run on the current CUDA stream. This module is the only place that imports torch for the
kernels; the extension never links it.

KV cache layout: ``key_cache`` and ``value_cache`` are each ``[num_blocks, block_size, num_kv_heads,
head_size]``; slot = block * block_size + offset; block 0 is the reserved null block. A
``torch.float8_e4m3fn`` cache stores ``x / scale`` (saturating at +-448) with one scale per tensor,
a ``torch.float8_e5m2`` cache likewise (saturating at +-57344).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastllm import kernels as _ops
from fastllm.kernels import GGML_QUANT_TYPES, quant_block_info, rope_cos_sin_cache
from fastllm.torch_extra import torch

__all__ = [
    "GGML_QUANT_TYPES",
    "activation",
    "build_rope_cos_sin_cache",
    "copy_blocks",
    "eager",
    "fp8_linear",
    "fused_add_rms_norm",
    "gelu_and_mul",
    "layer_norm",
    "lora_apply",
    "lora_slot_pointers",
    "model_op",
    "paged_attention",
    "quant_block_info",
    "quant_linear",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "sample",
    "silu_and_mul",
    "softcap",
    "swap_blocks",
    "to_csr",
]

_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


def eager(op):
    """The plain Python body of one of these custom ops, for eager hot paths: calling it skips
    the dispatcher (~8 us a call on a CPU). Under torch.compile call the op itself."""
    return getattr(op, "_init_fn", op)


def model_op(op) -> Callable:
    """What model code calls for ``op``: its plain body (:func:`eager`) when eager, the registered
    op while ``torch.compile`` traces."""
    body = eager(op)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return body(*args, **kwargs)

    call.__name__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    return call


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


# The kernels' name of each float8 cache format (their fp8_format argument).
_FP8_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _cache(t: torch.Tensor) -> torch.Tensor:
    # DLPack has no portable float8 code: fp8 caches cross as uint8 views (with _fp8_format).
    return t.view(torch.uint8) if t.dtype in _FP8_FORMATS else t


def _fp8_format(cache: torch.Tensor) -> str:
    # Which float8 a uint8 view holds; ignored for float caches.
    return _FP8_FORMATS.get(cache.dtype, "e4m3")


# float8 KV caches cross as uint8 views (``_np``), like the DLPack route's.
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def _numpy_ok(*tensors: torch.Tensor) -> bool:
    """True when a call passes its tensors as numpy views (see the module docstring): the floating
    point ones given here are all CPU float32/float16 (or float8 caches)."""
    for t in tensors:  # a loop, not all(<generator>): this runs ~6 times per layer per step
        if t.dtype not in _NUMPY_DTYPES or t.device.type != "cpu":
            return False
    return True


def _np(t: torch.Tensor):
    return _cache(t).numpy()


# ---- cache ops ------------------------------------------------------------------------------------


@torch.library.custom_op("fastllm::reshape_and_cache", mutates_args=("key_cache", "value_cache"))
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value ``[num_tokens, num_kv_heads, head_size]`` into the caches at
    ``slot_mapping`` (int64; negative slots are skipped)."""
    if _numpy_ok(key, value, key_cache, value_cache):
        _ops.reshape_and_cache(key.numpy(), value.numpy(), _np(key_cache), _np(value_cache),
                               slot_mapping.numpy(), k_scale, v_scale, 0, _fp8_format(key_cache))
        return
    _ops.reshape_and_cache(
        key,
        value,
        _cache(key_cache),
        _cache(value_cache),
        slot_mapping,
        k_scale,
        v_scale,
        _stream(key),
        _fp8_format(key_cache),
    )


@reshape_and_cache.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    return None


@torch.library.custom_op("fastllm::copy_blocks", mutates_args=("cache",))
def copy_blocks(cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks inside one cache: ``block_mapping`` int32 ``[n, 2]`` of (src, dst) pairs, on the
    cache's device."""
    _ops.copy_blocks(_cache(cache), block_mapping, _stream(cache))


@copy_blocks.register_fake
def _(cache, block_mapping):
    return None


@torch.library.custom_op("fastllm::swap_blocks", mutates_args=("dst",))
def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy block ``block_mapping[i, 0]`` of ``src`` onto block ``block_mapping[i, 1]`` of ``dst``
    (device <-> host, or host <-> host); ``block_mapping`` is an int64 CPU tensor ``[n, 2]``."""
    device_side = src if src.is_cuda else dst
    _ops.swap_blocks(_cache(src), _cache(dst), block_mapping.cpu(), _stream(device_side))


@swap_blocks.register_fake
def _(src, dst, block_mapping):
    return None


# ---- attention ------------------------------------------------------------------------------------


@torch.library.custom_op("fastllm::paged_attention", mutates_args=())
def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_context_len: int = 0,
) -> torch.Tensor:
    """Causal varlen paged attention: query ``[num_tokens, num_heads, head_size]``;
    ``query_start_loc`` int32 ``[num_seqs + 1]``; ``context_lens`` int32 ``[num_seqs]`` counts the
    cached tokens including this step's (written first with :func:`reshape_and_cache`);
    ``block_tables`` int32 ``[num_seqs, max_blocks]`` padded with 0. ``max_context_len`` (a host
    bound of ``context_lens``) lets the CUDA kernel split long contexts across thread blocks."""
    if _numpy_ok(query, key_cache, value_cache):
        out = torch.empty(query.shape, dtype=query.dtype)
        _ops.paged_attention(out.numpy(), query.numpy(), _np(key_cache), _np(value_cache),
                             query_start_loc.numpy(), context_lens.numpy(), block_tables.numpy(),
                             scale, sliding_window, softcap, k_scale, v_scale, max_context_len,
                             None, 0, _fp8_format(key_cache))
        return out
    out = torch.empty_like(query)
    workspace = None
    if query.is_cuda and max_context_len > 0:
        nbytes = _ops.paged_attention_workspace_bytes(
            query.shape[0], query.shape[1], query.shape[2], max_context_len
        )
        if nbytes > 0:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=query.device)
    _ops.paged_attention(
        out,
        query,
        _cache(key_cache),
        _cache(value_cache),
        query_start_loc,
        context_lens,
        block_tables,
        scale,
        sliding_window,
        softcap,
        k_scale,
        v_scale,
        max_context_len,
        workspace,
        _stream(query),
        _fp8_format(key_cache),
    )
    return out


@paged_attention.register_fake
def _(
    query,
    key_cache,
    value_cache,
    query_start_loc,
    context_lens,
    block_tables,
    scale,
    sliding_window=-1,
    softcap=0.0,
    k_scale=1.0,
    v_scale=1.0,
    max_context_len=0,
):
    return torch.empty_like(query)


# ---- norms, rotary, activations --------------------------------------------------------------------


@torch.library.custom_op("fastllm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (float accumulation)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _numpy_ok(x, weight):
        _ops.rms_norm(out.numpy(), x.numpy(), weight.numpy(), eps, 0)
    else:
        _ops.rms_norm(out, x, weight, eps, _stream(x))
    return out


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastllm::fused_add_rms_norm", mutates_args=("x", "residual"))
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: ``residual += x`` (rounded to the dtype), then ``x = rms_norm(residual) * weight``."""
    if _numpy_ok(x, residual, weight):
        _ops.fused_add_rms_norm(x.numpy(), residual.numpy(), weight.numpy(), eps, 0)
    else:
        _ops.fused_add_rms_norm(x, residual, weight, eps, _stream(x))


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return None


@torch.library.custom_op("fastllm::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension (biased variance,
    float accumulation); ``bias`` None for none."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _numpy_ok(x, weight) and (bias is None or _numpy_ok(bias)):
        _ops.layer_norm(out.numpy(), x.numpy(), weight.numpy(),
                        None if bias is None else bias.numpy(), eps, 0)
    else:
        _ops.layer_norm(out, x, weight, bias, eps, _stream(x))
    return out


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastllm::rotary_embedding", mutates_args=("query", "key"))
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool = True,
) -> None:
    """Rotate query ``[num_tokens, num_heads * head_size]`` (and key) in place by ``positions``
    (int64) with ``cos_sin_cache`` float32 ``[max_position, rotary_dim]`` = cat(cos, sin)."""
    if _numpy_ok(query, cos_sin_cache) and (key is None or _numpy_ok(key)):
        _ops.rotary_embedding(positions.numpy(), query.numpy(),
                              None if key is None else key.numpy(), cos_sin_cache.numpy(),
                              head_size, is_neox, 0)
        return
    _ops.rotary_embedding(positions, query, key, cos_sin_cache, head_size, is_neox, _stream(query))


@rotary_embedding.register_fake
def _(positions, query, key, cos_sin_cache, head_size, is_neox=True):
    return None


def _act_and_mul(x: torch.Tensor, activation: int) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    if _numpy_ok(x):
        _ops.act_and_mul(out.numpy(), x.numpy(), activation, 0)
    else:
        _ops.act_and_mul(out, x, activation, _stream(x))
    return out


@torch.library.custom_op("fastllm::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``."""
    return _act_and_mul(x, _ACTIVATIONS["silu"])


@silu_and_mul.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fastllm::gelu_and_mul", mutates_args=())
def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x[..., :d]) * x[..., d:]``; ``approximate`` is "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _act_and_mul(x, _ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"])


@gelu_and_mul.register_fake
def _(x, approximate="none"):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fastllm::activation", mutates_args=())
def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Elementwise ``name`` (silu, gelu_tanh, gelu or relu) of x, a new tensor."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {name!r}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _numpy_ok(x):
        _ops.activation(out.numpy(), x.numpy(), _ACTIVATIONS[name], 0)
    else:
        _ops.activation(out, x, _ACTIVATIONS[name], _stream(x))
    return out


@activation.register_fake
def _(x, name):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastllm::softcap", mutates_args=("x",))
def softcap(x: torch.Tensor, cap: float) -> None:
    """In place: ``x = cap * tanh(x / cap)`` (cap > 0; Gemma 2's final logits)."""
    if _numpy_ok(x):
        _ops.softcap(x.numpy(), cap, 0)
    else:
        _ops.softcap(x, cap, _stream(x))


@softcap.register_fake
def _(x, cap):
    return None


# ---- quantized linear ------------------------------------------------------------------------------

def quant_linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, quant_type: int,
                      bias: torch.Tensor | None = None, allow_simd: bool = True) -> torch.Tensor:
    """The eager body of :func:`quant_linear`, writing into ``out`` (float32 ``[..., n]``); models
    call it directly on hot paths to skip the dispatcher. ``allow_simd=False`` forces the scalar
    CPU code (tests compare the two)."""
    _ops.quant_gemm(out, x, weight, quant_type, bias, allow_simd, _stream(x))
    return out


@torch.library.custom_op("fastllm::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_type: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``W`` ``[out_features, in_features]`` kept in a GGUF block
    encoding: ``weight`` is uint8 ``[out_features, bytes_per_row]`` (rows of whole blocks) and
    ``quant_type`` a ggml type id (see ``GGML_QUANT_TYPES``). ``x`` is float32 ``[..., in_features]``
    with a dense last dimension. On the CPU, Q8_0/Q4_0/Q4_1 quantize ``x`` to int8 per 32 values
    and use integer dot products; Q4_K/Q6_K and the CUDA kernels accumulate in float."""
    out = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32, device=x.device)
    return quant_linear_into(out, x, weight, quant_type, bias)


@quant_linear.register_fake
def _(x, weight, quant_type, out_features, bias=None):
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


@torch.library.custom_op("fastllm::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale * (x @ e4m3(W).T) (+ bias)`` for FP8 weights kept as stored: ``weight`` uint8
    ``[out_features, in_features]`` e4m3fn codes, ``scale`` float32 ``[out_features]`` (one per
    row), ``x`` float32 ``[..., in_features]`` with a dense last dimension; float accumulation."""
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        _ops.fp8_gemm(out.numpy(), x.numpy(), weight.numpy(), scale.numpy(),
                      None if bias is None else bias.numpy(), 0)
    else:
        _ops.fp8_gemm(out, x, weight, scale, bias, _stream(x))
    return out


@fp8_linear.register_fake
def _(x, weight, scale, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


# ---- LoRA ------------------------------------------------------------------------------------------


def lora_slot_pointers(
    matrices: Sequence[torch.Tensor | None], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 ``[len(matrices)]`` of each matrix's ``data_ptr()`` (0 for None), on ``device``: the
    ``lora_a_ptrs`` / ``lora_b_ptrs`` of :func:`lora_apply`. The matrices must stay alive (and
    unmoved) while the pointers are used; each must be float32 and contiguous, since the kernel
    reads it as a dense row-major matrix."""
    addresses = []
    for i, m in enumerate(matrices):
        if m is None:
            addresses.append(0)
            continue
        if m.dtype != torch.float32 or m.dim() != 2 or not m.is_contiguous():
            raise ValueError(f"lora_slot_pointers: matrix {i} must be a contiguous 2-D float32 "
                             f"tensor, not {m.dtype} {tuple(m.shape)}")
        addresses.append(m.data_ptr())
    return torch.tensor(addresses, dtype=torch.int64, device=device)


@torch.library.custom_op("fastllm::lora_apply", mutates_args=("out",))
def lora_apply(
    out: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a_ptrs: torch.Tensor,
    lora_b_ptrs: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    max_rank: int = 0,
    b_transposed: bool = False,
    weight_dtype: str = "float32",
) -> None:
    """In place, for every token ``t`` whose slot ``s = token_slots[t]`` is >= 0 and has an A:
    ``out[t] += scales[s] * (x[t] @ A_s.T) @ B_s.T``, all adapters of the step in one call.

    ``out`` float32 ``[T, n]`` (may be a column slice of a wider output, e.g. the q part of a
    fused qkv), ``x`` float32 ``[T, k]``, ``token_slots`` int32 ``[T]`` (-1 = base model). Per slot
    (``[num_slots]``, on ``x``'s device): ``lora_a_ptrs`` / ``lora_b_ptrs`` int64 addresses of A_s
    float32 ``[rank_s, k]`` and B_s float32 ``[n, rank_s]`` (:func:`lora_slot_pointers`; 0 = the
    slot has no adapter on this module), ``ranks`` int32, ``scales`` float32. ``max_rank`` bounds
    the ranks (0 = 512); CUDA sizes its scratch by it. ``b_transposed``: the B addresses hold
    B_s transposed, ``[rank_s, n]`` (the executors' layout: no transposition per call).
    ``weight_dtype``: A and B are "float32" or "float16" (converted exactly as read). A token's result does not depend on the rest
    of the batch (bit for bit)."""
    if _numpy_ok(out, x):
        _ops.lora_apply(out.numpy(), x.numpy(), token_slots.numpy(), lora_a_ptrs.numpy(),
                        lora_b_ptrs.numpy(), ranks.numpy(), scales.numpy(), 0, max_rank, None,
                        b_transposed, weight_dtype)
        return
    workspace = None
    if x.is_cuda:
        workspace = torch.empty(_ops.lora_workspace_bytes(x.shape[0], max_rank),
                                dtype=torch.uint8, device=x.device)
    _ops.lora_apply(out, x, token_slots, lora_a_ptrs, lora_b_ptrs, ranks, scales, _stream(x),
                    max_rank, workspace, b_transposed, weight_dtype)


@lora_apply.register_fake
def _(out, x, token_slots, lora_a_ptrs, lora_b_ptrs, ranks, scales, max_rank=0,
      b_transposed=False, weight_dtype="float32"):
    return None


# ---- sampling -------------------------------------------------------------------------------------


@torch.library.custom_op("fastllm::sample", mutates_args=())
def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    repetition_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    generator_offsets: torch.Tensor | None = None,
    global_seed: int = 0,
    prompt_offsets: torch.Tensor | None = None,
    prompt_ids: torch.Tensor | None = None,
    output_offsets: torch.Tensor | None = None,
    output_ids: torch.Tensor | None = None,
    bias_offsets: torch.Tensor | None = None,
    bias_ids: torch.Tensor | None = None,
    bias_values: torch.Tensor | None = None,
    allowed_offsets: torch.Tensor | None = None,
    allowed_ids: torch.Tensor | None = None,
    num_top_logprobs: int = 0,
    draft_ids: torch.Tensor | None = None,
    typical_threshold: float = 0.0,
    typical_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row of float32 ``logits [num_rows, vocab]``.

    Per-row parameters are 1-D tensors (None = neutral for every row): temperature (0 = greedy),
    top_k (int32, <= 0 off), top_p, min_p, the three penalties, seeds (int64, < 0 = unseeded: use
    ``global_seed`` and the row index) and generator_offsets (int64, the request's output position).
    Token lists are CSR pairs (int32 offsets ``[num_rows + 1]`` + int32 ids): prompt and output
    tokens (repetition applies to both, presence/frequency to output), logit bias (+ float values)
    and allowed ids. ``draft_ids`` (int32, -1 = none) turns on typical acceptance for the rows
    that have one, with ``typical_threshold`` and ``typical_alpha``. Returns (token int32 [R], logprob [R], rank int32 [R], top_logprobs [R, N],
    top_ids int32 [R, N]); logprobs are of the raw logits (see fastllm/kernels/sampling.h)."""
    rows = logits.shape[0]
    device = logits.device
    sampled = torch.empty(rows, dtype=torch.int32, device=device)
    logprob = torch.empty(rows, dtype=torch.float32, device=device)
    rank = torch.empty(rows, dtype=torch.int32, device=device)
    top_logprobs = torch.empty((rows, num_top_logprobs), dtype=torch.float32, device=device)
    top_ids = torch.empty((rows, num_top_logprobs), dtype=torch.int32, device=device)
    workspace = None
    if logits.is_cuda:
        workspace = torch.empty(
            _ops.sampling_workspace_bytes(rows, logits.shape[1]), dtype=torch.uint8, device=device
        )
    inputs = _ops.SamplingInputs(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seeds=seeds,
        generator_offsets=generator_offsets,
        global_seed=global_seed & 0xFFFFFFFFFFFFFFFF,
        prompt_offsets=prompt_offsets,
        prompt_ids=prompt_ids,
        output_offsets=output_offsets,
        output_ids=output_ids,
        bias_offsets=bias_offsets,
        bias_ids=bias_ids,
        bias_values=bias_values,
        allowed_offsets=allowed_offsets,
        allowed_ids=allowed_ids,
        draft_ids=draft_ids,
        typical_threshold=typical_threshold,
        typical_alpha=typical_alpha,
    )
    _ops.sample(
        logits,
        inputs,
        sampled,
        sampled_logprob=logprob,
        sampled_rank=rank,
        top_logprobs=top_logprobs if num_top_logprobs > 0 else None,
        top_ids=top_ids if num_top_logprobs > 0 else None,
        workspace=workspace,
        stream=_stream(logits),
    )
    return sampled, logprob, rank, top_logprobs, top_ids


@sample.register_fake
def _(
    logits,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    seeds=None,
    generator_offsets=None,
    global_seed=0,
    prompt_offsets=None,
    prompt_ids=None,
    output_offsets=None,
    output_ids=None,
    bias_offsets=None,
    bias_ids=None,
    bias_values=None,
    allowed_offsets=None,
    allowed_ids=None,
    num_top_logprobs=0,
    draft_ids=None,
    typical_threshold=0.0,
    typical_alpha=0.0,
):
    rows = logits.shape[0]
    return (
        logits.new_empty(rows, dtype=torch.int32),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows, dtype=torch.int32),
        logits.new_empty((rows, num_top_logprobs), dtype=torch.float32),
        logits.new_empty((rows, num_top_logprobs), dtype=torch.int32),
    )


def to_csr(
    lists: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets int32 [len(lists) + 1], values) for per-row lists of token ids (or bias values
    with ``dtype=torch.float32``)."""
    offsets = [0]
    flat: list = []
    for row in lists:
        flat.extend(row)
        offsets.append(len(flat))
    return (
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(flat, dtype=dtype, device=device),
    )


# ---- rotary cos/sin cache -------------------------------------------------------------------------


def build_rope_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float = 10000.0,
    rope_scaling: dict | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`fastllm.kernels.rope_cos_sin_cache` as a tensor on ``device``: one
    implementation, so the torch model and the torch-free CPU path share the same table bit for
    bit."""
    cache = rope_cos_sin_cache(rotary_dim, max_position, base, rope_scaling)
    return torch.from_numpy(cache).to(device)
