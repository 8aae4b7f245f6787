"""The one output processor behind both front ends (LLMEngine offline, AsyncLLM for the server):
it owns the per-request text states and turns the engine's native outputs into per-request
results. An n / best_of request is ONE engine request whose children are told apart by
seq_index; the processor groups them, and for best_of > n ranks the candidates by cumulative
logprob and keeps the best n (the engine ranks nothing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from fastllm.engine.request_state import RequestState
from fastllm.outputs import CompletionOutput, Logprob, RequestOutput
from fastllm.sampling_params import SamplingParams
from fastllm.tokenizer import Tokenizer


@dataclass(slots=True)
class StreamChunk:
    """What one child sequence of a request produced since its previous chunk (slots: a server
    makes one per token)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finished: bool  # this child finished
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    full_text: str = ""  # all text so far (for non-streaming responses)
    prompt_logprobs: list | None = None  # prompt positions scored since the previous chunk
    index: int = 0  # the child (choice) index: seq_index, or the rank among best_of's kept n
    cumulative_logprob: float | None = None


class RequestGroup:
    """One engine request: its num_samples child states (index = the engine's seq_index)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer, streaming: bool):
        self.request_id = request_id
        self.params = params
        self.streaming = streaming
        self.ranked = params.num_samples > params.n  # best_of: rank, keep the best n
        child_params = params
        if self.ranked and params.logprobs is None:
            child_params = replace(params, logprobs=0)  # ranking needs each token's logprob
        no_prompt_lps = replace(child_params, prompt_logprobs=None)
        # Prompt logprobs come only with sequence 0.
        self.children = [
            RequestState(request_id, prompt, prompt_token_ids,
                         child_params if i == 0 else no_prompt_lps, tokenizer)
            for i in range(params.num_samples)]
        self.engine_done = False  # the engine reported request_finished (the id is free)
        self.new_tokens = 0  # tokens the last process() call applied (for metrics)
        self.error: str | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.children[0].prompt_token_ids

    @property
    def finished(self) -> bool:
        return self.error is not None or all(c.finished for c in self.children)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.children)

    @property
    def finish_reason(self) -> str | None:
        """The request's reason: "error" when any child failed, else the last child's."""
        if self.failed:
            return "error"
        return self.children[-1].finish_reason

    def kept(self) -> list[tuple[int, RequestState]]:
        """(choice index, child) of the children the response carries: all of them, or for
        best_of the n of highest cumulative logprob, best first."""
        if not self.ranked:
            return list(enumerate(self.children))
        best = sorted(self.children, key=lambda c: c.cumulative_logprob or 0.0,
                      reverse=True)[: self.params.n]
        return list(enumerate(best))

    def chunk(self, index: int, child: RequestState, whole: bool = False) -> StreamChunk:
        """The child's delta (or, with whole, everything it produced) as a chunk."""
        if whole:
            text, tokens, logprobs = child.text, list(child.token_ids), child.logprobs
            prompt_logprobs = self.children[0].prompt_logprobs if index == 0 else None
        else:
            text, tokens, logprobs = child.take_delta()
            prompt_logprobs = child.take_prompt_logprobs()
        if self.params.logprobs is None:
            logprobs = None  # asked for by the front end only to rank best_of candidates
        return StreamChunk(
            request_id=self.request_id, text=text, token_ids=tokens, logprobs=logprobs,
            finished=child.finished, finish_reason=child.finish_reason,
            stop_reason=child.stop_reason, num_prompt_tokens=len(child.prompt_token_ids),
            num_output_tokens=len(child.token_ids), num_cached_tokens=child.num_cached_tokens,
            full_text=child.text if child.finished else "", prompt_logprobs=prompt_logprobs,
            index=index, cumulative_logprob=child.cumulative_logprob)

    def to_output(self) -> RequestOutput:
        completions = []
        for index, child in self.kept():
            completions.append(CompletionOutput(
                index=index, text=child.text, token_ids=list(child.token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=child.logprobs if self.params.logprobs is not None else None,
                finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        first = self.children[0]
        return RequestOutput(
            request_id=self.request_id, prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids, outputs=completions,
            finished=self.finished, prompt_logprobs=first.prompt_logprobs,
            num_cached_tokens=min(c.num_cached_tokens for c in self.children))


class OutputProcessor:
    """Owns every live request's group. ``abort`` ends a request in the engine (called when stop
    strings ended every child, or a child failed)."""

    def __init__(self, tokenizer: Tokenizer, abort: Callable[[str], object]):
        self.tokenizer = tokenizer
        self._abort = abort
        self.groups: dict[str, RequestGroup] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def __len__(self) -> int:
        return len(self.groups)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, streaming: bool = False) -> RequestGroup:
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        group = RequestGroup(request_id, prompt, prompt_token_ids, params, self.tokenizer,
                             streaming)
        self.groups[request_id] = group
        return group

    def remove(self, request_id: str) -> RequestGroup | None:
        return self.groups.pop(request_id, None)

    def process(self, outputs) -> list[tuple[RequestGroup, list[StreamChunk]]]:
        """Applies one batch of native outputs. Returns, per request touched (in order of first
        touch), its group and its new chunks (streaming groups only; a best_of group's chunks
        come all at once when it finishes, ranked). A finished group has left the processor."""
        touched: dict[str, tuple[RequestGroup, list[StreamChunk]]] = {}
        for out in outputs:
            group = self.groups.get(out.request_id)
            if group is None:
                continue  # ended earlier (stop strings, failure, abort); these are its aborts
            index = int(out.seq_index)
            if index >= len(group.children):
                continue
            child = group.children[index]
            if out.request_id not in touched:
                touched[out.request_id] = (group, [])
                group.new_tokens = 0
            entry = touched[out.request_id]
            if out.request_finished:
                group.engine_done = True
            if child.finished:
                continue  # a stop string ended it; the engine cannot abort one child alone
            group.new_tokens += len(out.new_token_ids)
            child.update(out)
            if child.failed:
                group.error = child.error
            if group.streaming and not group.ranked and not group.failed:
                chunk = group.chunk(index, child)
                if chunk.text or chunk.token_ids or chunk.finished or chunk.prompt_logprobs:
                    entry[1].append(chunk)
        for group, chunks in touched.values():
            if not group.finished:
                continue
            del self.groups[group.request_id]
            if not group.engine_done:
                # Stop strings ended every child (or a child failed): end the rest in the core.
                self._abort(group.request_id)
            if group.streaming and group.ranked and not group.failed:
                chunks.extend(group.chunk(i, c, whole=True) for i, c in group.kept())
        return list(touched.values())
