"""Guided decoding as the executors' logits hook (``_C.models.LogitsHook``): the executor calls
:meth:`apply` and :meth:`advance` only in steps where a sampled row belongs to a watched request
(the manager watches each request it registers), so unguided steps never enter Python."""

from __future__ import annotations

from fastllm import _C
from fastllm.guided.registry import GuidedRegistry


class GuidedLogitsHook(_C.models.LogitsHook):
    def __init__(self, registry: GuidedRegistry):
        super().__init__()
        self.registry = registry
        self._rows: list | None = None  # apply()'s guided rows, for the advance() of its step

    def apply(self, plan, logits) -> None:
        """Masks the guided rows of ``logits`` (the step's sampled rows) in place."""
        self._rows = self.registry.apply(plan, logits)

    def advance(self, plan, tokens) -> None:
        """Feeds the tokens sampled from the logits :meth:`apply` saw to their matchers."""
        rows, self._rows = self._rows, None
        if rows:
            self.registry.advance(rows, tokens)
