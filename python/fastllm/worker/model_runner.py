"""The Python executor: owns the model and its paged KV cache, runs one BatchPlan per call.

Plan arrays arrive as numpy views of the engine's buffers and become torch tensors without a copy
on the CPU (one host-to-device copy each on a GPU). The engine thread calls execute() with the GIL.
A quantized GGUF model on the CPU can run without torch instead: see ``cpu_runner``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fastllm import _C, ops
from fastllm.config import ModelConfig
from fastllm.models.attention import AttentionMetadata
from fastllm.models.llama import build_cpu_decoder
from fastllm.models.native_cpu import native_decoder_enabled
from fastllm.torch_extra import torch
from fastllm.worker.step_inputs import (
    sampling_inputs,
    score_prompt_logprobs,
    with_prompt_logprobs,
)

logger = logging.getLogger(__name__)

# The ops' plain bodies: the registered custom ops go through torch's dispatcher, whose first
# call imports torch._dynamo (~2 s and ~100 MB) for nothing in eager execution.
_sample = ops.eager(ops.sample)
_swap_blocks = ops.eager(ops.swap_blocks)
_copy_blocks = ops.eager(ops.copy_blocks)


@dataclass
class StepOutputs:
    """What a step produced, as plain arrays (picklable: a distributed worker sends it back to
    the engine's process): the sampled tokens and their logprobs, or, when the step's logits
    were asked for instead (``logits``), those; and the step's prompt logprobs."""

    tokens: np.ndarray | None = None
    logprob: np.ndarray | None = None  # with top_ids and top_lp, when a row asked for logprobs
    top_ids: np.ndarray | None = None
    top_lp: np.ndarray | None = None
    logits: np.ndarray | None = None
    prompt_logprobs: tuple | None = None

    def to_result(self):
        """The engine's StepResult of these outputs."""
        tokens = self.tokens if self.tokens is not None else np.empty(0, dtype=np.int32)
        if self.logprob is not None:
            result = _C.StepResult(tokens, self.logprob, self.top_ids, self.top_lp)
        else:
            result = _C.StepResult(tokens)
        return with_prompt_logprobs(result, self.prompt_logprobs)


def sample_logits(plan, logits: torch.Tensor, hook, to_device) -> StepOutputs:
    """Samples one token per sample row of ``logits`` ([num_samples, vocab] float32) with the
    plan's parameters; ``hook`` (guided decoding, or None) masks the rows it watches first and
    sees the tokens after; ``to_device`` moves a numpy array to the logits' device."""
    kw = {name: to_device(value) if isinstance(value, np.ndarray) else value
          for name, value in sampling_inputs(plan).items()}
    hooked = hook is not None and hook.wants(plan)
    if hooked:
        hook.apply(plan, logits)
    tokens, logprob, _rank, top_lp, top_ids = _sample(logits, **kw)
    if hooked:
        hook.advance(plan, tokens)
    if (plan.num_logprobs >= 0).any():
        return StepOutputs(tokens.cpu().numpy(), logprob.cpu().numpy(), top_ids.cpu().numpy(),
                           top_lp.cpu().numpy())
    return StepOutputs(tokens.cpu().numpy())


class ModelExecutor(_C.Executor):
    """Implements the engine's Executor with a torch model and fastllm kernels."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, device: torch.device,
                 kv_dtype: torch.dtype, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 max_loras: int = 0):
        super().__init__()
        self.model = model
        self.config = config
        self.device = device
        self.kv_dtype = kv_dtype
        self.block_size = block_size
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
        if device.type == "cpu" and native_decoder_enabled():
            self.cpu_decoder = build_cpu_decoder(model, self.kv_caches, block_size)
        self._logits_hook = None
        self.lora_slots = None
        if max_loras > 0:
            from fastllm.lora.slots import LoraSlots

            self.lora_slots = LoraSlots(config.num_hidden_layers, max_loras, device)

    # ---- LoRA (fastllm.lora.manager calls these) --------------------------------------------

    def add_lora(self, lora_id: int, adapter) -> None:
        if self.lora_slots is None:
            raise ValueError("LoRA is not enabled for this engine (enable_lora)")
        self.lora_slots.add(lora_id, adapter)

    def remove_lora(self, lora_id: int) -> None:
        if self.lora_slots is not None:
            self.lora_slots.remove(lora_id)

    def set_logits_hook(self, hook) -> None:
        """Installs a ``_C.models.LogitsHook`` (guided decoding), as on the C++ executor: it
        edits the sampled rows' logits of the steps where it ``wants`` the plan."""
        if self._logits_hook is not None:
            raise RuntimeError("the logits hook is already set")
        self._logits_hook = hook

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

    # ---- Executor ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan):
        self._apply_block_ops(plan)
        if plan.num_tokens == 0:
            return _C.StepResult(np.empty(0, dtype=np.int32))
        input_ids = self._tensor(plan.token_ids)
        # The C++ layer loop has no LoRA of its own here: steps with adapters take the Python one.
        if self.cpu_decoder is not None and not plan.any_lora:
            hidden = self.model.model.embed_tokens(input_ids)
            self.cpu_decoder.forward(hidden.numpy(), plan.positions, plan.slot_mapping,
                                     plan.query_start_loc, plan.context_lens, plan.block_tables,
                                     int(plan.max_context_len))
        else:
            hidden = self._model_forward(plan, input_ids)
        return self.step_outputs(plan, hidden).to_result()

    def step_outputs(self, plan, hidden: torch.Tensor, return_logits: bool = False
                     ) -> StepOutputs:
        """The step's prompt logprobs and sampled tokens from its final hidden states (or, with
        return_logits, the sample rows' logits unsampled)."""
        prompt_logprobs = self._prompt_logprobs(plan, hidden) if plan.any_prompt_logprobs else None
        if plan.num_samples == 0:
            return StepOutputs(prompt_logprobs=prompt_logprobs)
        rows = hidden[self._tensor(plan.sample_token_indices).to(torch.int64)]
        logits = self.model.compute_logits(rows)
        if return_logits:
            out = StepOutputs(logits=logits.cpu().numpy())
        else:
            # The logits hook (guided decoding) masks rows of watched requests before sampling
            # and sees the sampled tokens after.
            out = sample_logits(plan, logits, self._logits_hook, self._tensor)
        out.prompt_logprobs = prompt_logprobs
        return out

    def _model_forward(self, plan, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self._tensor(plan.positions).to(torch.int64)
        return self.model(input_ids, positions, self.kv_caches, self.attention_metadata(plan))

    def attention_metadata(self, plan) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._tensor(plan.slot_mapping),
            query_start_loc=self._tensor(plan.query_start_loc),
            context_lens=self._tensor(plan.context_lens),
            block_tables=self._tensor(plan.block_tables),
            max_context_len=int(plan.max_context_len),
            lora=self.lora_slots.batch(plan) if self.lora_slots is not None else None,
        )

    def _prompt_logprobs(self, plan, hidden: torch.Tensor) -> tuple | None:
        def score(logits, allowed_offsets, allowed_ids, k):
            _, logprob, _, top_values, top_indices = _sample(
                logits, allowed_offsets=self._tensor(allowed_offsets),
                allowed_ids=self._tensor(allowed_ids), num_top_logprobs=k)
            return logprob.cpu().numpy(), top_values.cpu().numpy(), top_indices.cpu().numpy()

        return score_prompt_logprobs(
            plan, lambda rows: self.model.compute_logits(hidden[self._tensor(rows)]), score)

