"""The torch executor's LoRA state: host copies of the loaded adapters, max_loras device slots
filled as steps need them (least recently used slot out, never one the step uses), and the
per-step LoraBatch that the model's projections read."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fastllm import ops
from fastllm.lora.adapter import LORA_TARGETS, LoraAdapter
from fastllm.torch_extra import torch

_lora_apply = ops.eager(ops.lora_apply)
# Slots keep B transposed ([rank, n], LoraModule.bt): the kernel then reads it as is.


@dataclass
class LoraBatch:
    """One step's adapters: each token's slot, and per (layer, target) the filled slots' A/B
    pointers, ranks and scales as the LoRA kernel takes them (None: no filled slot targets it)."""

    token_slots: torch.Tensor  # int32 [num_tokens] on the model's device
    tables: list[list[tuple | None]]
    weight_dtype: str  # "float32" or "float16": the slots' A and B^T
    slot_of_token: np.ndarray  # the same slots on the host
    slot_modules: list  # slot -> per (layer, target) (A, B^T, scale) or None

    @functools.cached_property
    def _rows(self) -> dict[int, torch.Tensor]:
        """Slot -> its tokens: only the exact fallback for non-float32 activations (which the
        float32 kernel does not take) needs them, so they are found on first use."""
        device = self.token_slots.device
        return {int(s): torch.from_numpy(np.flatnonzero(self.slot_of_token == s)).to(device)
                for s in np.unique(self.slot_of_token) if s >= 0}

    def apply(self, layer: int, target: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the step's LoRA deltas of projection `target` (an index into LORA_TARGETS);
        out may be a column slice of a wider output (a fused projection)."""
        entry = self.tables[layer][target]
        if entry is None:
            return
        if x.dtype == torch.float32 and out.dtype == torch.float32:
            _lora_apply(out, x, self.token_slots, *entry, b_transposed=True,
                        weight_dtype=self.weight_dtype)
            return
        for slot, rows in self._rows.items():
            m = self.slot_modules[slot][layer][target]
            if m is not None:
                a, bt, scale = m
                delta = (x[rows].float() @ a.float().t()) @ bt.float()
                out[rows] += (delta * scale).to(out.dtype)


class LoraSlots:
    def __init__(self, num_layers: int, num_slots: int, device: torch.device):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.device = device
        self._host: dict[int, list[list[tuple | None]]] = {}  # lora id -> [layer][target]
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU order
        self._slot_modules: list[list[list[tuple | None]] | None] = [None] * num_slots
        self._weight_dtype = "float32"
        # The kernel's pointer tables over the filled slots, rebuilt only when a slot changes
        # (not every step): tokens name only their own step's slots, so other filled slots in
        # the tables are never read.
        self._tables: list[list[tuple | None]] | None = None
        # add/remove come from the front end while the engine thread builds a step's batch.
        self._lock = threading.Lock()

    def add(self, lora_id: int, adapter: LoraAdapter) -> None:
        modules = []
        for per_layer in adapter.layer_modules(self.num_layers):
            modules.append([None if m is None else (torch.from_numpy(m.a), torch.from_numpy(m.bt),
                                                   float(m.scale)) for m in per_layer])
        with self._lock:
            self._weight_dtype = adapter.dtype
            self._host[lora_id] = modules
            self._free_slot_of(lora_id)  # a reloaded id gets fresh weights

    def remove(self, lora_id: int) -> None:
        with self._lock:
            self._host.pop(lora_id, None)
            self._free_slot_of(lora_id)

    def _free_slot_of(self, lora_id: int) -> None:
        slot = self._slot_of.pop(lora_id, None)
        if slot is not None:
            self._slot_modules[slot] = None
            self._tables = None

    def _slot_for(self, lora_id: int, in_step: set[int]) -> int:
        if lora_id in self._slot_of:
            self._slot_of.move_to_end(lora_id)
            return self._slot_of[lora_id]
        if lora_id not in self._host:
            raise RuntimeError(f"LoRA adapter {lora_id} is not loaded")
        free = [s for s in range(self.num_slots) if self._slot_modules[s] is None]
        if free:
            slot = free[0]
        else:
            victim = next((i for i in self._slot_of if i not in in_step), None)
            if victim is None:
                raise RuntimeError(f"a step with more than {self.num_slots} LoRA adapters")
            slot = self._slot_of.pop(victim)
        on_device = [[None if m is None else (m[0].to(self.device), m[1].to(self.device), m[2])
                      for m in per_layer] for per_layer in self._host[lora_id]]
        self._slot_modules[slot] = on_device
        self._slot_of[lora_id] = slot
        self._tables = None
        return slot

    def batch(self, plan) -> LoraBatch | None:
        """The step's LoraBatch, filling slots for its adapters; None when it has none."""
        if not plan.any_lora:
            return None
        with self._lock:
            return self._batch(plan)

    def _batch(self, plan) -> LoraBatch:
        lora_ids = plan.lora_ids
        in_step = {int(i) for i in lora_ids if i != 0}
        slot_of_seq = np.array([self._slot_for(int(i), in_step) if i != 0 else -1
                                for i in lora_ids], dtype=np.int32)
        token_slots = np.repeat(slot_of_seq, np.diff(plan.query_start_loc))
        if self._tables is None:
            self._tables = self._build_tables()
        return LoraBatch(self._to_device(token_slots), self._tables, self._weight_dtype,
                         token_slots, list(self._slot_modules))

    def _build_tables(self) -> list[list[tuple | None]]:
        filled = [s for s in range(self.num_slots) if self._slot_modules[s] is not None]
        tables: list[list[tuple | None]] = []
        for layer in range(self.num_layers):
            row = []
            for target in range(len(LORA_TARGETS)):
                a_ptrs = np.zeros(self.num_slots, np.int64)
                b_ptrs = np.zeros(self.num_slots, np.int64)
                ranks = np.ones(self.num_slots, np.int32)
                scales = np.zeros(self.num_slots, np.float32)
                any_slot = False
                for s in filled:
                    m = self._slot_modules[s][layer][target]
                    if m is not None:
                        a_ptrs[s], b_ptrs[s] = m[0].data_ptr(), m[1].data_ptr()
                        ranks[s], scales[s] = m[0].shape[0], m[2]
                        any_slot = True
                # The kernel's rank bound sizes its CUDA grid and scratch: the slots' largest.
                row.append((self._to_device(a_ptrs), self._to_device(b_ptrs),
                            self._to_device(ranks), self._to_device(scales), int(ranks.max()))
                           if any_slot else None)
            tables.append(row)
        return tables

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t if self.device.type == "cpu" else t.to(self.device)
