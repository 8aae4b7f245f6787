"""The distributed executor: the engine's Executor when the model runs on several workers.

The engine stays one (one scheduler, one KV block pool sized by the smallest worker): each step
its BatchPlan is copied out (``plan.snapshot``) and broadcast to every worker, the workers run
their shares of the model and talk among themselves through torch.distributed, and the last rank
sends the sampled tokens back. Steps whose rows a logits hook (guided decoding) watches get the
logits back instead and are sampled here, in the engine's process, where the hook lives.

A worker that dies stops the executor: the step in flight and every later one raise
``WorkerError``, and ``on_dead`` (given by the engine's owner) hears of it at once, so a server
turns unhealthy and exits instead of waiting on a peer that will never answer.
"""

from __future__ import annotations

import logging

from fastllm import _C
from fastllm.config import EngineArgs
from fastllm.distributed.errors import WorkerError
from fastllm.distributed.plan import snapshot

logger = logging.getLogger(__name__)


def uses_distributed_executor(args: EngineArgs) -> bool:
    """Whether the engine's model runs on workers (tp or pp > 1, or Ray asked for)."""
    return (args.tensor_parallel_size * args.pipeline_parallel_size > 1
            or args.resolved_executor_backend() == "ray")


def start_workers(args: EngineArgs, device: str, on_dead=None):
    """The worker group of the configured backend, started and loaded."""
    from fastllm.distributed.mp_workers import LocalLauncher, WorkerGroup

    if args.resolved_executor_backend() == "ray":
        from fastllm.distributed.ray_workers import RayLauncher

        return WorkerGroup(args, RayLauncher(args, device), on_dead)

    if device == "cuda":
        from fastllm.torch_extra import torch

        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if torch.cuda.device_count() < world:
            raise ValueError(f"{world} workers need {world} GPUs on this machine; torch sees "
                             f"{torch.cuda.device_count()} (span machines with "
                             "--distributed-executor-backend ray)")
    return WorkerGroup(args, LocalLauncher(device), on_dead)


class DistributedExecutor(_C.Executor):
    def __init__(self, workers):
        super().__init__()
        self.workers = workers
        self._logits_hook = None

    @property
    def dead(self) -> str | None:
        """Why the executor stopped (a worker died or failed), or None while it runs."""
        return self.workers.dead

    def set_logits_hook(self, hook) -> None:
        if self._logits_hook is not None:
            raise RuntimeError("the logits hook is already set")
        self._logits_hook = hook

    def add_lora(self, lora_id: int, adapter) -> None:
        raise ValueError("LoRA adapters are not supported with tensor/pipeline parallelism yet")

    def remove_lora(self, lora_id: int) -> None:
        pass

    def execute(self, plan):
        hook = self._logits_hook
        hooked = hook is not None and plan.num_samples > 0 and hook.wants(plan)
        out = self.workers.execute(snapshot(plan), hooked)
        if out is None:
            raise WorkerError("the last worker returned no outputs")
        if hooked:
            from fastllm.torch_extra import torch
            from fastllm.worker.model_runner import sample_logits

            sampled = sample_logits(plan, torch.from_numpy(out.logits), hook, torch.from_numpy)
            sampled.prompt_logprobs = out.prompt_logprobs
            out = sampled
        return out.to_result()

    def shutdown(self) -> None:
        self.workers.shutdown()
