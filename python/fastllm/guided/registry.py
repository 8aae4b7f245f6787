"""Per-sequence matcher state the executor reaches during a step.

The front end registers a matcher under the engine request id before adding the request and
unregisters it when the request finishes or is aborted. In each step the executor calls
:meth:`GuidedRegistry.apply` on the logits of the sampled rows (rows of guided sequences get
their disallowed tokens set to -inf; other rows are not touched) and :meth:`advance` with the
sampled tokens.

A matcher advances only on tokens the engine appends: each state counts the tokens it consumed
and compares that with the row's output position (the number of output tokens the sequence
already has). A sequence preempted and recomputed keeps its output tokens, so its matcher stays
valid; should a row ever sample a position again, the matcher is rolled back to it first.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from fastllm.guided.backends import Matcher

logger = logging.getLogger(__name__)


class _State:
    __slots__ = ("broken", "consumed", "matcher")

    def __init__(self, matcher: Matcher):
        self.matcher = matcher
        self.consumed = 0
        self.broken = False


class GuidedRegistry:
    def __init__(self, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = int(vocab_size)
        self.words = (self.vocab_size + 31) // 32
        self.eos_token_ids = sorted(eos_token_ids)
        # One state per child sequence (an n > 1 request's children share its id and are told
        # apart by the plan's sample_child_indices).
        self._states: dict[str, list[_State]] = {}
        self._lock = threading.Lock()
        self._buffer = np.zeros((0, self.words), dtype=np.int32)
        # (guided rows, unguided rows) per step, for the overhead benchmark
        self.num_guided_rows = 0

    # ---- front end (asyncio or offline thread) -----------------------------------------------

    def register(self, request_id: str, matcher: Matcher | list[Matcher]) -> None:
        """A matcher for the request, or one per child sequence (seq_index order)."""
        matchers = matcher if isinstance(matcher, list) else [matcher]
        with self._lock:
            self._states[request_id] = [_State(m) for m in matchers]

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._states.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    # ---- executor (engine thread) ------------------------------------------------------------

    def apply(self, plan, logits) -> list | None:
        """Masks the logits (a float32 numpy array or torch tensor, rows = sampled rows) of guided
        rows in place; returns what :meth:`advance` needs, or None when no row of this step is
        guided."""
        if not self._states or plan.num_samples == 0:
            return None
        request_ids = plan.request_ids
        seq_index = plan.sample_seq_indices
        children = getattr(plan, "sample_child_indices", None)
        positions = plan.output_positions
        rows: list[tuple[int, _State]] = []
        with self._lock:
            for r in range(plan.num_samples):
                states = self._states.get(request_ids[int(seq_index[r])])
                if states is None:
                    continue
                child = int(children[r]) if children is not None and len(children) else 0
                if child < len(states):
                    rows.append((r, states[child]))
        if not rows:
            return None
        for r, state in rows:
            self._sync(state, int(positions[r]))
        if self._buffer.shape[0] < len(rows):
            self._buffer = np.zeros((max(len(rows), 2 * self._buffer.shape[0]), self.words),
                                    dtype=np.int32)
        bitmask = self._buffer[: len(rows)]
        for i, (_, state) in enumerate(rows):
            if state.broken:
                self._eos_only(bitmask, i)
            else:
                state.matcher.fill_bitmask(bitmask, i)
        vocab = logits.shape[1]
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        if allowed.shape[1] >= vocab:
            allowed = allowed[:, :vocab]
        else:
            allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))
        index = np.array([r for r, _ in rows], dtype=np.int64)
        if isinstance(logits, np.ndarray):
            logits[index] = np.where(allowed == 0, np.float32(-np.inf), logits[index])
        else:
            _mask_tensor_rows(logits, index, allowed == 0)
        self.num_guided_rows += len(rows)
        return rows

    def advance(self, rows: list, tokens) -> None:
        """Feeds each guided row's sampled token (tokens: numpy array or torch tensor) to its
        matcher."""
        sampled = tokens if isinstance(tokens, np.ndarray) else tokens.cpu().numpy()
        for r, state in rows:
            if state.broken:
                continue
            token = int(sampled[r])
            if state.matcher.is_terminated():
                state.consumed += 1  # an end of sequence after the grammar finished
                continue
            if not state.matcher.accept(token):
                logger.warning("guided decoding: the grammar rejected sampled token %d", token)
                state.broken = True
            state.consumed += 1

    def _sync(self, state: _State, position: int) -> None:
        if position == state.consumed or state.broken:
            return
        if position < state.consumed:
            state.matcher.rollback(state.consumed - position)
            state.consumed = position
        else:
            logger.warning("guided decoding: a sequence is %d tokens ahead of its matcher",
                           position - state.consumed)
            state.broken = True

    def _eos_only(self, bitmask: np.ndarray, row: int) -> None:
        words = bitmask.view(np.uint32)
        words[row] = 0
        for t in self.eos_token_ids:
            if t < self.vocab_size:
                words[row, t >> 5] |= np.uint32(1 << (t & 31))


def _mask_tensor_rows(logits, index: np.ndarray, disallowed: np.ndarray) -> None:
    """-inf into the disallowed entries of rows ``index`` of a torch tensor (on its device)."""
    from fastllm.torch_extra import torch

    index_t = torch.from_numpy(index).to(logits.device)
    sub = logits.index_select(0, index_t)
    sub.masked_fill_(torch.from_numpy(disallowed).to(logits.device), float("-inf"))
    logits.index_copy_(0, index_t, sub)
