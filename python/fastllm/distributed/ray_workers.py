"""The ``ray`` backend: the model's workers (and, with --engine-use-ray, engine replicas) as Ray
actors, on whichever machines of the cluster have room. The engine joins the cluster named by
RAY_ADDRESS (``ray start --head`` on one machine, ``ray start --address=...`` on the others), or
starts a local one; a caller that already ran ``ray.init`` keeps its cluster.

Each worker gets one bundle of a placement group (one GPU and one CPU, or one CPU on a CPU
engine), packed onto as few machines as possible. The actor connects back to the engine (TCP,
with the engine's random key) and runs the same worker loop as a local process
(``mp_workers.worker_main``); collectives go through torch.distributed between the actors,
rendezvousing at rank 0's machine.
"""

from __future__ import annotations

import importlib
import logging
import os

from fastllm.config import EngineArgs
from fastllm.distributed.mp_workers import free_port
from fastllm.distributed.procs import STARTUP_TIMEOUT_S, node_ip

logger = logging.getLogger(__name__)


def init_ray():
    """The ray module, connected to a cluster (RAY_ADDRESS's, the caller's, or a new local
    one). ValueError when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise ValueError("the ray backend needs Ray, which is not installed "
                         "(pip install 'fastllm[ray]')") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
                 log_to_driver=True)
    return ray


class _Process:
    """The body of a Ray actor that hosts a fastllm process (a worker or an engine replica)."""

    def endpoint(self) -> tuple[str, int]:
        """An address of this actor's machine and a free port there (rank 0's rendezvous)."""
        return node_ip(), free_port("0.0.0.0")

    def run(self, entry: str, address, authkey: bytes, index: int) -> None:
        """Runs ``entry`` ("module:function", e.g. the worker loop) as this actor's life."""
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(address, authkey, index)


class RayActors:
    """Ray actors in one placement group, each running one fastllm process (the launcher
    interface of ``mp_workers.WorkerGroup`` and ``data_parallel``)."""

    def __init__(self, bundle: dict, entry: str):
        """bundle: each actor's resources; entry: "module:function" each actor runs, with
        (address, authkey, index) of the listener to connect back to."""
        self.ray = init_ray()
        self.bundle = bundle
        self.entry = entry
        self.tcp_host = node_ip()
        self.actors: list = []
        self.runs: list = []
        self.pg = None

    def start(self, address, authkey: bytes, count: int) -> None:
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.pg = placement_group([dict(self.bundle)] * count, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=STARTUP_TIMEOUT_S)
        if not ready:
            raise ValueError(f"the Ray cluster has no room for {count} x {self.bundle} "
                             f"(cluster resources: {ray.cluster_resources()})")
        actor_class = ray.remote(_Process)
        for index in range(count):
            self.actors.append(actor_class.options(
                num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=index)).remote())
        self._endpoint = ray.get(self.actors[0].endpoint.remote())
        self.runs = [actor.run.remote(self.entry, address, authkey, index)
                     for index, actor in enumerate(self.actors)]

    def init_method(self) -> str:
        host, port = self._endpoint
        return f"tcp://{host}:{port}"

    def gone(self) -> str | None:
        ready, _ = self.ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return self.describe_exit(self.runs.index(ready[0])) if ready else None

    def wait_any_exit(self) -> int | None:
        ready, _ = self.ray.wait(self.runs, num_returns=1)
        return self.runs.index(ready[0])

    def describe_exit(self, index: int) -> str:
        try:
            self.ray.get(self.runs[index], timeout=2)
        except self.ray.exceptions.GetTimeoutError:
            return f"Ray actor {index} closed its connection"
        except Exception as e:  # noqa: BLE001 - the actor's death, as Ray reports it
            return f"Ray actor {index} died: {str(e).splitlines()[0]}"
        return f"Ray actor {index} returned"

    def kill(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception as e:  # noqa: BLE001 - already gone
                logger.debug("ray.kill: %s", e)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None

    def wait_exit(self, timeout: float) -> None:
        if self.runs:
            self.ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)


class RayLauncher(RayActors):
    """The model's tp x pp workers as Ray actors."""

    def __init__(self, args: EngineArgs, device: str):
        super().__init__({"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1},
                         "fastllm.distributed.mp_workers:worker_main")
        self.device = device

    def device_of(self, rank: int) -> str:
        # Ray gives each actor its GPU as the only visible one.
        return "cuda:0" if self.device == "cuda" else "cpu"
