"""The torch-free executor: a quantized GGUF model on the CPU (``fastllm.models.cpu_model``), its
paged KV cache as numpy arrays, one BatchPlan per call.

The sibling of ``model_runner.ModelExecutor`` with its native CPU decoder, step for step: the same
embedding, decoder, output projection and sampling kernels on the same inputs, so both give the
same tokens and logprobs. Plan arrays go to the kernels as they are (numpy views of the engine's
buffers). The engine thread calls execute() with the GIL.
"""

from __future__ import annotations

import mmap

import numpy as np

from fastllm import _C
from fastllm.models.cpu_model import CpuModel
from fastllm.worker.step_inputs import (
    sampling_inputs,
    score_prompt_logprobs,
    with_prompt_logprobs,
)

_SAMPLE_INPUTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seeds", "generator_offsets")
_SAMPLE_LISTS = ("prompt_offsets", "prompt_ids", "output_offsets", "output_ids", "bias_offsets",
                 "bias_ids", "bias_values", "allowed_offsets", "allowed_ids")


def lazy_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An uninitialized array whose pages become resident only when written, 4 KiB at a time:
    anonymous memory of its own, where numpy would advise transparent huge pages for a large
    array (2 MiB resident per first touch, for a KV cache that grows a block at a time)."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, count * np.dtype(dtype).itemsize), dtype=dtype,
                         count=count).reshape(shape)


def sample(logits: np.ndarray, kw: dict, logprobs: bool
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """``_C.ops.sample`` on numpy arrays: (token int32 [R], logprob [R] or None when not
    ``logprobs``, top logprobs [R, N], top ids int32 [R, N]) for the keyword arguments of
    ``step_inputs.sampling_inputs``."""
    rows = logits.shape[0]
    top = kw.get("num_top_logprobs", 0)
    tokens = np.empty(rows, dtype=np.int32)
    logprob = np.empty(rows, dtype=np.float32) if logprobs else None
    top_logprobs = np.empty((rows, top), dtype=np.float32)
    top_ids = np.empty((rows, top), dtype=np.int32)
    _C.ops.sample(logits, *(kw.get(name) for name in _SAMPLE_INPUTS),
                  kw.get("global_seed", 0) & 0xFFFFFFFFFFFFFFFF,
                  *(kw.get(name) for name in _SAMPLE_LISTS), tokens, logprob, None,
                  top_logprobs if top else None, top_ids if top else None, None, 0)
    return tokens, logprob, top_logprobs, top_ids


class CpuExecutor(_C.Executor):
    """Implements the engine's Executor with a ``CpuModel`` and fastllm's CPU kernels."""

    def __init__(self, model: CpuModel, kv_dtype: str, block_size: int, num_blocks: int,
                 num_swap_blocks: int, seed: int = 0):
        super().__init__()
        c = model.config
        self.model = model
        self.seed = seed
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(lazy_empty(shape, kv_dtype), lazy_empty(shape, kv_dtype))
                          for _ in range(c.num_hidden_layers)]
        swap_shape = (num_swap_blocks, *shape[1:])
        self.swap_caches = [(lazy_empty(swap_shape, kv_dtype), lazy_empty(swap_shape, kv_dtype))
                            for _ in range(c.num_hidden_layers)] if num_swap_blocks else []
        self.decoder = model.new_decoder(self.kv_caches, block_size)

    def _apply_block_ops(self, plan) -> None:
        swap_out = plan.blocks_to_swap_out
        swap_in = plan.blocks_to_swap_in
        copy = plan.blocks_to_copy
        if len(swap_out):
            mapping = swap_out.astype(np.int64)
            for (k, v), (hk, hv) in zip(self.kv_caches, self.swap_caches):
                _C.ops.swap_blocks(k, hk, mapping, 0)
                _C.ops.swap_blocks(v, hv, mapping, 0)
        if len(swap_in):
            mapping = swap_in.astype(np.int64)
            for (k, v), (hk, hv) in zip(self.kv_caches, self.swap_caches):
                _C.ops.swap_blocks(hk, k, mapping, 0)
                _C.ops.swap_blocks(hv, v, mapping, 0)
        if len(copy):
            mapping = copy.copy()
            for k, v in self.kv_caches:
                _C.ops.copy_blocks(k, mapping, 0)
                _C.ops.copy_blocks(v, mapping, 0)

    def execute(self, plan):
        self._apply_block_ops(plan)
        if plan.num_tokens == 0:
            return _C.StepResult(np.empty(0, dtype=np.int32))
        hidden = self.model.embed(plan.token_ids)
        self.decoder.forward(hidden, plan.positions, plan.slot_mapping, plan.query_start_loc,
                             plan.context_lens, plan.block_tables, int(plan.max_context_len))
        prompt_logprobs = self._prompt_logprobs(plan, hidden) if plan.any_prompt_logprobs else None
        if plan.num_samples == 0:
            return with_prompt_logprobs(_C.StepResult(np.empty(0, dtype=np.int32)),
                                        prompt_logprobs)
        logits = self.model.logits(hidden[plan.sample_token_indices])
        kw = sampling_inputs(plan, self.seed)
        # Guided decoding (fastllm.guided attaches its registry here): masks the rows of guided
        # sequences before sampling and advances their matchers after.
        guided = getattr(self, "guided", None)
        guided_rows = guided.apply(plan, logits) if guided is not None else None
        want_logprobs = bool((plan.num_logprobs >= 0).any())
        tokens, logprob, top_lp, top_ids = sample(logits, kw, want_logprobs)
        if guided_rows:
            guided.advance(guided_rows, tokens)
        if want_logprobs:
            result = _C.StepResult(tokens, logprob, top_ids, top_lp)
        else:
            result = _C.StepResult(tokens)
        return with_prompt_logprobs(result, prompt_logprobs)

    def _prompt_logprobs(self, plan, hidden: np.ndarray) -> tuple | None:
        def score(logits, allowed_offsets, allowed_ids, k):
            kw = {"allowed_offsets": allowed_offsets, "allowed_ids": allowed_ids,
                  "num_top_logprobs": k}
            _, logprob, top_values, top_indices = sample(logits, kw, True)
            return logprob, top_values, top_indices

        return score_prompt_logprobs(plan, lambda rows: self.model.logits(hidden[rows]), score)
