"""n and best_of: a request becomes num_samples child sequences in the engine. The first child
computes the prompt; the others are added once it has, and share the prompt's full KV blocks
through the prefix cache. The parent collects them, and with best_of keeps the n candidates of
highest cumulative logprob."""

from __future__ import annotations

from fastllm.outputs import CompletionOutput, RequestOutput
from fastllm.sampling_params import SamplingParams


def child_id(parent_id: str, index: int) -> str:
    return f"{parent_id}#{index}"


class ParentRequest:
    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.params = params
        self.child_ids = [child_id(request_id, i) for i in range(params.num_samples)]
        self.done: dict[str, RequestOutput] = {}
        # (prompt text, prompt ids) of siblings not yet added to the engine
        self.pending: tuple[str | None, list[int]] | None = None

    def add_finished(self, child: RequestOutput) -> RequestOutput | None:
        """Records a finished child; returns the parent's output once every child is done."""
        self.done[child.request_id] = child
        if len(self.done) < len(self.child_ids):
            return None
        children = [self.done[cid] for cid in self.child_ids]
        completions = [c.outputs[0] for c in children]
        if self.params.num_samples > self.params.n:
            completions = sorted(completions, key=lambda c: c.cumulative_logprob or 0.0,
                                 reverse=True)[: self.params.n]
        outputs = []
        for index, comp in enumerate(completions):
            logprobs = comp.logprobs if self.params.logprobs is not None else None
            outputs.append(CompletionOutput(index=index, text=comp.text, token_ids=comp.token_ids,
                                            cumulative_logprob=comp.cumulative_logprob,
                                            logprobs=logprobs, finish_reason=comp.finish_reason,
                                            stop_reason=comp.stop_reason))
        first = children[0]
        return RequestOutput(request_id=self.request_id, prompt=first.prompt,
                             prompt_token_ids=first.prompt_token_ids, outputs=outputs,
                             finished=True, prompt_logprobs=first.prompt_logprobs,
                             num_cached_tokens=min(c.num_cached_tokens for c in children))
