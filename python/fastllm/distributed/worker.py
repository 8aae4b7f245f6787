"""One rank of a tensor x pipeline parallel group: its share of the model (see
``ParallelContext``), that share's KV cache, and the step it runs for every BatchPlan the engine
broadcasts. The same class runs in a local process (``mp_workers``) and in a Ray actor
(``ray_workers``).

A step on a rank: apply the plan's block ops to its cache; run its layers (the first stage embeds
the tokens; later stages receive the previous stage's activations); the last stage computes the
logits (all-gathered across its tensor ranks) and samples. With several stages the step's
sequences go through in micro-batches: stage s sends micro-batch m on (asynchronously) and starts
on m + 1 while stage s + 1 works on m, so the stages overlap within one step.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os

import numpy as np

from fastllm.config import EngineArgs, ModelConfig
from fastllm.distributed.plan import PlanView
from fastllm.models.parallel import ParallelContext
from fastllm.torch_extra import torch

logger = logging.getLogger(__name__)

dist = torch.distributed

# How long a collective may wait for a peer before it fails (a peer that died is noticed by the
# engine at once; this bounds what a surviving worker waits).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("FASTLLM_DISTRIBUTED_TIMEOUT", "600"))


def micro_batch_bounds(query_start_loc: np.ndarray, num_seqs: int, count: int) -> list[int]:
    """Sequence indices [0, b1, .., num_seqs] cutting the step into at most ``count`` non-empty
    micro-batches of about equal token counts (a sequence's tokens stay in one micro-batch:
    its rows attend to each other)."""
    count = max(1, min(count, num_seqs))
    total = int(query_start_loc[num_seqs])
    bounds = [0]
    for k in range(1, count):
        target = total * k / count
        cut = int(np.searchsorted(query_start_loc[:num_seqs + 1], target, side="left"))
        cut = max(cut, bounds[-1] + 1)
        if cut >= num_seqs - (count - k - 1):
            cut = num_seqs - (count - k)
        bounds.append(cut)
    bounds.append(num_seqs)
    return bounds


class Worker:
    def __init__(self, args: EngineArgs, rank: int, init_method: str, device: str,
                 threads: int | None = None):
        """Joins the process group (``init_method``: tcp://host:port of rank 0) and loads this
        rank's share of the model onto ``device`` ("cpu" or "cuda:N")."""
        from fastllm.loader import iterate_weights, load_config, resolve_model
        from fastllm.models import get_model_class

        if threads:
            torch.set_num_threads(threads)
        tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                init_method=init_method, rank=rank, world_size=tp * pp,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        tp_group = None
        if tp > 1:
            # Every rank creates every stage's group, in the same order.
            for stage in range(pp):
                group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
                if stage == rank // tp:
                    tp_group = group
        self.parallel = ParallelContext(tp, rank % tp, pp, rank // tp, tp_group)
        self.args = args
        source = resolve_model(args.model, args.load_format)
        mc = ModelConfig.from_dict(load_config(source), args)
        self.model_config = mc
        dtype_name = args.resolve_dtype(mc.torch_dtype, self.device.type)
        self.dtype = getattr(torch, dtype_name)
        self.kv_dtype_name = args.resolve_kv_cache_dtype(dtype_name, False)
        self.block_size = args.resolve_block_size(self.device.type)
        with torch.device("meta"):
            model = get_model_class(mc)(mc, parallel=self.parallel)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.init_buffers(self.device)
        # Every rank reads the whole checkpoint and keeps its share (load_weights cuts it).
        fmt = source.load_format if args.load_format == "auto" else args.load_format
        model.load_weights(iterate_weights(source, fmt, self.dtype))
        self.model = model.eval()
        first, end = self.parallel.layer_range(mc.num_hidden_layers)
        # The cache of this rank: its stage's layers, its KV heads.
        self.cache_config = dataclasses.replace(
            mc, num_hidden_layers=end - first,
            num_key_value_heads=mc.num_key_value_heads // tp)
        self.runner = None

    @property
    def is_output_rank(self) -> bool:
        """Whether this rank's outputs go back to the engine (the last one)."""
        return self.parallel.rank == self.parallel.world_size - 1

    def kv_blocks(self) -> tuple[int, int]:
        """(device, host swap) KV blocks this rank's memory holds: the engine sizes its one
        block pool by the smallest."""
        args, cc = self.args, self.cache_config
        per_block = cc.kv_bytes_per_block(self.block_size, self.kv_dtype_name)
        if args.num_gpu_blocks_override is not None:
            blocks = int(args.num_gpu_blocks_override)
        elif self.device.type == "cpu":
            blocks = args.cpu_kv_bytes() // per_block
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * args.gpu_memory_utilization - (total - free)
            budget -= 4 * cc.hidden_size * 4096 * torch.empty((), dtype=self.dtype).element_size()
            blocks = int(budget // per_block)
        swap = 0
        if self.device.type == "cuda" or args.preemption_mode == "swap":
            swap = int(args.swap_space * (1 << 30)) // per_block
        return blocks, swap

    def init_cache(self, num_blocks: int, num_swap_blocks: int) -> None:
        from fastllm.worker.model_runner import ModelExecutor

        self.runner = ModelExecutor(self.model, self.cache_config, self.device,
                                    getattr(torch, self.kv_dtype_name), self.block_size,
                                    num_blocks, num_swap_blocks)

    @torch.inference_mode()
    def execute(self, snapshot: dict, return_logits: bool = False):
        """Runs one broadcast plan; the last rank returns its StepOutputs, the others None."""
        from fastllm.worker.model_runner import StepOutputs

        plan = PlanView(snapshot)
        runner, p = self.runner, self.parallel
        runner._apply_block_ops(plan)
        if plan.num_tokens == 0:
            return StepOutputs() if self.is_output_rank else None
        if p.pp_size == 1:
            hidden = runner._model_forward(plan, runner._tensor(plan.token_ids))
        else:
            hidden = self._pipeline_forward(plan)
        if not p.is_last_stage:
            return None
        # Every tensor rank of the last stage takes part (the logits are gathered); one answers.
        out = runner.step_outputs(plan, hidden, return_logits)
        return out if self.is_output_rank else None

    def _pipeline_forward(self, plan) -> torch.Tensor | None:
        """This stage's layers over the step's micro-batches; the last stage's final hidden
        states of every token row (in plan order), None on the other stages."""
        from fastllm.models.attention import AttentionMetadata

        runner, p = self.runner, self.parallel
        qsl = plan.query_start_loc
        bounds = micro_batch_bounds(qsl, plan.num_seqs, p.pp_size)
        hidden_size = self.model_config.hidden_size
        outputs, sends = [], []
        for s0, s1 in itertools.pairwise(bounds):
            t0, t1 = int(qsl[s0]), int(qsl[s1])
            meta = AttentionMetadata(
                slot_mapping=runner._tensor(plan.slot_mapping[t0:t1]),
                query_start_loc=runner._tensor(qsl[s0:s1 + 1] - t0),
                context_lens=runner._tensor(plan.context_lens[s0:s1]),
                block_tables=runner._tensor(plan.block_tables[s0:s1]),
                max_context_len=int(plan.context_lens[s0:s1].max()))
            positions = runner._tensor(plan.positions[t0:t1]).to(torch.int64)
            if p.is_first_stage:
                ids, intermediate = runner._tensor(plan.token_ids[t0:t1]), None
            else:
                # hidden and residual of the micro-batch's rows, in one message
                buf = torch.empty((2, t1 - t0, hidden_size), dtype=self.dtype,
                                  device=self.device)
                dist.recv(buf, src=p.prev_stage_rank)
                ids, intermediate = None, (buf[0], buf[1])
            out = self.model(ids, positions, runner.kv_caches, meta, intermediate)
            if p.is_last_stage:
                outputs.append(out)
            else:
                sends.append(dist.isend(torch.stack(out), dst=p.next_stage_rank))
        for work in sends:
            work.wait()
        return torch.cat(outputs) if p.is_last_stage else None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
