"""The Python executor: owns the model and its paged KV cache, runs one BatchPlan per call.

Plan arrays arrive as numpy views of the engine's buffers and become torch tensors without a copy
on the CPU (one host-to-device copy each on a GPU). The engine thread calls execute() with the GIL.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from fastllm import _C, ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata
from fastllm.models.native_cpu import build_cpu_decoder

logger = logging.getLogger(__name__)

# The ops' plain bodies: the registered custom ops go through torch's dispatcher, whose first
# call imports torch._dynamo (~2 s and ~100 MB) for nothing in eager execution.
_sample = ops.eager(ops.sample)
_swap_blocks = ops.eager(ops.swap_blocks)
_copy_blocks = ops.eager(ops.copy_blocks)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads *
            config.head_dim * elem)


class ModelExecutor(_C.Executor):
    """Implements the engine's Executor with a torch model and fastllm kernels."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, device: torch.device,
                 kv_dtype: torch.dtype, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 seed: int = 0):
        super().__init__()
        self.model = model
        self.config = config
        self.device = device
        self.kv_dtype = kv_dtype
        self.block_size = block_size
        self.seed = seed
        shape = (num_gpu_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # torch.empty leaves pages untouched, so resident memory grows only with use.
        self.kv_caches = [
            (torch.empty(shape, dtype=kv_dtype, device=device),
             torch.empty(shape, dtype=kv_dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.swap_caches = []
        if num_cpu_blocks > 0:
            host_shape = (num_cpu_blocks, *shape[1:])
            pin = device.type == "cuda"
            self.swap_caches = [
                (torch.empty(host_shape, dtype=kv_dtype, pin_memory=pin),
                 torch.empty(host_shape, dtype=kv_dtype, pin_memory=pin))
                for _ in range(config.num_hidden_layers)
            ]
        # Quantized Llama-family models on the CPU run their layer loop in C++ (one call a step);
        # FASTLLM_CPU_NATIVE_DECODER=0 keeps the per-op Python path.
        self.cpu_decoder = None
        if device.type == "cpu" and os.environ.get("FASTLLM_CPU_NATIVE_DECODER", "1") != "0":
            self.cpu_decoder = build_cpu_decoder(model, self.kv_caches, block_size)

    # ---- helpers -----------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=False)

    def _apply_block_ops(self, plan) -> None:
        swap_out = plan.blocks_to_swap_out
        swap_in = plan.blocks_to_swap_in
        copy = plan.blocks_to_copy
        # Swap mappings are read on the host (int64); copy mappings go to the cache's device.
        if len(swap_out):
            mapping = torch.from_numpy(swap_out.astype(np.int64))
            for (k, v), (hk, hv) in zip(self.kv_caches, self.swap_caches):
                _swap_blocks(k, hk, mapping)
                _swap_blocks(v, hv, mapping)
        if len(swap_in):
            mapping = torch.from_numpy(swap_in.astype(np.int64))
            for (k, v), (hk, hv) in zip(self.kv_caches, self.swap_caches):
                _swap_blocks(hk, k, mapping)
                _swap_blocks(hv, v, mapping)
        if len(copy):
            mapping = self._tensor(copy.copy())
            for k, v in self.kv_caches:
                _copy_blocks(k, mapping)
                _copy_blocks(v, mapping)

    def _sampling_inputs(self, plan) -> dict:
        rows = plan.num_samples
        kw: dict = {
            "temperature": self._tensor(plan.temperature),
            "top_k": self._tensor(plan.top_k),
            "top_p": self._tensor(plan.top_p),
            "min_p": self._tensor(plan.min_p),
            "seeds": self._tensor(plan.seeds),
            "generator_offsets": self._tensor(plan.output_positions),
            # Unseeded rows draw from a per-step stream of the engine's seed.
            "global_seed": (self.seed * 1_000_003 + plan.step_id) & 0x7FFFFFFFFFFFFFFF,
        }
        history = plan.history_token_ids
        if len(history):
            offsets = plan.history_offsets
            prompt_lens = plan.history_prompt_lens
            lens = np.diff(offsets)
            pos_in_row = np.arange(len(history)) - np.repeat(offsets[:-1], lens)
            is_prompt = pos_in_row < np.repeat(prompt_lens, lens)
            out_lens = lens - prompt_lens
            kw.update(
                repetition_penalty=self._tensor(plan.repetition_penalty),
                presence_penalty=self._tensor(plan.presence_penalty),
                frequency_penalty=self._tensor(plan.frequency_penalty),
                prompt_offsets=self._tensor(_offsets(prompt_lens)),
                prompt_ids=self._tensor(np.ascontiguousarray(history[is_prompt])),
                output_offsets=self._tensor(_offsets(out_lens)),
                output_ids=self._tensor(np.ascontiguousarray(history[~is_prompt])),
            )
        if len(plan.bias_token_ids):
            # The request's logit_bias, plus -inf for EOS/stop ids of rows below min_tokens.
            kw.update(
                bias_offsets=self._tensor(plan.bias_offsets.copy()),
                bias_ids=self._tensor(plan.bias_token_ids.copy()),
                bias_values=self._tensor(plan.bias_values.copy()),
            )
        if len(plan.allowed_token_ids):
            kw.update(
                allowed_offsets=self._tensor(plan.allowed_offsets.copy()),
                allowed_ids=self._tensor(plan.allowed_token_ids.copy()),
            )
        num_logprobs = plan.num_logprobs
        kw["num_top_logprobs"] = int(num_logprobs.max()) if rows and num_logprobs.max() > 0 else 0
        return kw

    # ---- Executor ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan):
        self._apply_block_ops(plan)
        if plan.num_tokens == 0:
            return _C.StepResult(np.empty(0, dtype=np.int32))
        input_ids = self._tensor(plan.token_ids)
        if self.cpu_decoder is not None:
            hidden = self.model.model.embed_tokens(input_ids)
            self.cpu_decoder.forward(hidden.numpy(), plan.positions, plan.slot_mapping,
                                     plan.query_start_loc, plan.context_lens, plan.block_tables,
                                     int(plan.max_context_len))
        else:
            hidden = self._model_forward(plan, input_ids)
        prompt_logprobs = self._prompt_logprobs(plan, hidden) if plan.any_prompt_logprobs else None
        if plan.num_samples == 0:
            return _with_prompt_logprobs(_C.StepResult(np.empty(0, dtype=np.int32)),
                                         prompt_logprobs)
        rows = hidden[self._tensor(plan.sample_token_indices).to(torch.int64)]
        logits = self.model.compute_logits(rows)
        kw = self._sampling_inputs(plan)
        # Guided decoding (fastllm.guided attaches its registry here): masks the rows of guided
        # sequences before sampling and advances their matchers after.
        guided = getattr(self, "guided", None)
        guided_rows = guided.apply(plan, logits) if guided is not None else None
        tokens, logprob, _rank, top_lp, top_ids = _sample(logits, **kw)
        if guided_rows:
            guided.advance(guided_rows, tokens)
        if (plan.num_logprobs >= 0).any():
            result = _C.StepResult(tokens.cpu(), logprob.cpu(), top_ids.cpu(), top_lp.cpu())
        else:
            result = _C.StepResult(tokens.cpu())
        return _with_prompt_logprobs(result, prompt_logprobs)

    def _model_forward(self, plan, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self._tensor(plan.positions).to(torch.int64)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(plan.slot_mapping),
            query_start_loc=self._tensor(plan.query_start_loc),
            context_lens=self._tensor(plan.context_lens),
            block_tables=self._tensor(plan.block_tables),
            max_context_len=int(plan.max_context_len),
        )
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _prompt_logprobs(self, plan, hidden: torch.Tensor) -> tuple:
        """Log-softmax scores of the prompt tokens for the sequences that asked for them: row at
        position p scores the prompt token at p + 1 (see BatchPlan.prompt_logprobs)."""
        qsl, pos, ids = plan.query_start_loc, plan.positions, plan.token_ids
        rows, targets, seqs = [], [], []
        for s in np.nonzero(plan.prompt_logprobs >= 0)[0]:
            start, end = int(qsl[s]), int(qsl[s + 1])
            last = min(end, start + max(0, int(plan.num_prompt_tokens[s]) - 1 - int(pos[start])))
            if last <= start:
                continue
            t = np.arange(start, last)
            tgt = np.where(t + 1 < end, ids[np.minimum(t + 1, end - 1)], plan.prompt_next_token[s])
            rows.append(t)
            targets.append(tgt)
            seqs.append(np.full(len(t), s, dtype=np.int32))
        if not rows:
            return None
        rows_t = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
        target_t = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(hidden.device)
        k = int(plan.prompt_logprobs.max())
        token_lp, top_lp, top_ids = [], [], []
        for chunk in range(0, len(rows_t), 256):  # bounds the [rows, vocab] logits
            idx = rows_t[chunk:chunk + 256]
            lp = torch.log_softmax(self.model.compute_logits(hidden[idx]), dim=-1)
            token_lp.append(lp.gather(1, target_t[chunk:chunk + 256, None])[:, 0])
            if k > 0:
                values, indices = lp.topk(k, dim=-1)
                top_lp.append(values)
                top_ids.append(indices.to(torch.int32))
        return (np.concatenate(seqs), torch.cat(token_lp).cpu(),
                torch.cat(top_ids).cpu() if k > 0 else None,
                torch.cat(top_lp).cpu() if k > 0 else None)


def _with_prompt_logprobs(result, prompt_logprobs):
    if prompt_logprobs is not None:
        result.set_prompt_logprobs(*prompt_logprobs)
    return result


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out
