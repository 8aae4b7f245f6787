"""LoraManager: the adapters an engine knows, loaded on first use and handed to its executor.

Adapters are registered by name (``--lora-modules``, ``/v1/load_lora_adapter``) or arrive with a
request (``LoRARequest``). Loaded adapters stay in host memory up to ``max_cpu_loras`` (least
recently used first out, never one that a request in flight or a served name holds); the executor
keeps its own view of the loaded ones (the C++ CPU executor reads them in place; the torch
executor copies them into ``max_loras`` device slots as steps need them). The engine never puts
more than ``max_loras`` adapters in one step."""

from __future__ import annotations

import threading
from collections import OrderedDict

from fastllm.config import ModelConfig
from fastllm.lora.adapter import LoraAdapter, load_adapter
from fastllm.lora.request import LoRARequest


class LoraManager:
    def __init__(self, config: ModelConfig, executor, max_loras: int, max_cpu_loras: int,
                 max_rank: int, dtype: str = "float32"):
        self.config = config
        self.executor = executor
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.max_rank = max_rank
        self.dtype = dtype  # of the adapters' weights as the executor reads them
        self._lock = threading.Lock()
        self._loaded: OrderedDict[int, LoraAdapter] = OrderedDict()  # LRU order
        self._in_flight: dict[int, int] = {}
        self._served: dict[str, LoRARequest] = {}  # name -> request (pinned)
        self._next_id = 1

    # ---- served names (the server's --lora-modules and runtime loading) ----------------------

    def serve(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """Loads an adapter under a name that requests can then use as their model."""
        with self._lock:
            if name in self._served:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
            while any(r.lora_int_id == self._next_id for r in self._served.values()) or \
                    self._next_id in self._loaded:
                self._next_id += 1
            request = LoRARequest(name, self._next_id, path, base_model_name)
            self._next_id += 1
            self._load(request)
            self._served[name] = request
        return request

    def unserve(self, name: str) -> None:
        """Forgets a served adapter; refused while requests using it are in flight."""
        with self._lock:
            request = self._served.get(name)
            if request is None:
                raise KeyError(name)
            if self._in_flight.get(request.lora_int_id, 0):
                raise ValueError(f"LoRA adapter {name!r} has requests in flight; unload it "
                                 "when they are done")
            del self._served[name]
            self._drop(request.lora_int_id)

    def served(self) -> dict[str, LoRARequest]:
        with self._lock:
            return dict(self._served)

    def lookup(self, name: str) -> LoRARequest | None:
        with self._lock:
            return self._served.get(name)

    # ---- requests ----------------------------------------------------------------------------

    def acquire(self, request: LoRARequest) -> int:
        """Makes the adapter ready for a request and holds it until release(); its id."""
        with self._lock:
            adapter = self._loaded.get(request.lora_int_id)
            if adapter is not None and adapter.path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} already names the adapter "
                                 f"at {adapter.path}")
            if adapter is None:
                self._load(request)
            self._loaded.move_to_end(request.lora_int_id)
            self._in_flight[request.lora_int_id] = self._in_flight.get(request.lora_int_id, 0) + 1
        return request.lora_int_id

    def release(self, lora_id: int) -> None:
        with self._lock:
            left = self._in_flight.get(lora_id, 0) - 1
            if left > 0:
                self._in_flight[lora_id] = left
                return
            self._in_flight.pop(lora_id, None)
            # Adapters beyond max_cpu_loras were held by requests in flight: now idle, they go.
            self._trim(self.max_cpu_loras)

    def num_loaded(self) -> int:
        with self._lock:
            return len(self._loaded)

    # ---- internals (lock held) ---------------------------------------------------------------

    def _load(self, request: LoRARequest) -> None:
        adapter = load_adapter(request.lora_name, request.lora_int_id, request.lora_path,
                               self.config, self.max_rank)
        adapter.base_model_name = request.base_model_name or adapter.base_model_name
        adapter.prepare(self.dtype)
        self._trim(self.max_cpu_loras - 1)
        self.executor.add_lora(adapter.lora_id, adapter)
        self._loaded[adapter.lora_id] = adapter

    def _trim(self, limit: int) -> None:
        """Unloads least recently used adapters until at most limit are loaded, sparing those
        that requests in flight or served names hold (more than max_cpu_loras stay loaded while
        that many are in use)."""
        pinned = {r.lora_int_id for r in self._served.values()}
        for lora_id in list(self._loaded):
            if len(self._loaded) <= limit:
                return
            if self._in_flight.get(lora_id) or lora_id in pinned:
                continue
            self._drop(lora_id)

    def _drop(self, lora_id: int) -> None:
        if self._loaded.pop(lora_id, None) is not None:
            self.executor.remove_lora(lora_id)
