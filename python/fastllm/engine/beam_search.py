"""Beam search over the engine: each step scores every live beam's next token with one
single-token request (logprobs = 2 x beam width), so the beams' shared prefixes come from the
prefix cache. The search itself is front-end agnostic: `run_beam_search` takes a function that
expands a batch of token sequences (sync for the offline API, async for the server)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastllm.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in HF / vLLM

    def validate(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam width must be at least 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError("early_stopping must be true, false or 'never'")


@dataclass
class Beam:
    tokens: list[int]  # generated tokens
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False

    def score(self, length_penalty: float) -> float:
        return self.cum_logprob / (max(len(self.tokens), 1) ** length_penalty)


# expand(list of full token sequences, top_k) -> for each, {token id: logprob} of its top_k
Expand = Callable[[list[list[int]], int], list[dict[int, float]]]
AsyncExpand = Callable[[list[list[int]], int], Awaitable[list[dict[int, float]]]]


class _Search:
    def __init__(self, prompt: list[int], params: BeamSearchParams, eos_ids: set[int]):
        params.validate()
        self.prompt = prompt
        self.params = params
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.live = [Beam([])]
        self.done: list[Beam] = []

    def requests(self) -> list[list[int]]:
        return [self.prompt + b.tokens for b in self.live]

    def advance(self, expansions: list[dict[int, float]]) -> bool:
        """Applies one step's expansions; returns False when the search is over."""
        width = self.params.beam_width
        candidates = []
        for beam, top in zip(self.live, expansions):
            for token, lp in top.items():
                candidates.append(Beam(beam.tokens + [token], beam.cum_logprob + lp,
                                       beam.logprobs + [lp]))
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        self.live = []
        for cand in candidates:
            if cand.tokens[-1] in self.eos_ids:
                cand.finished = True
                if len(self.done) < width or self._beats_done(cand):
                    self.done.append(cand)
            else:
                self.live.append(cand)
            if len(self.live) == width:
                break
        self.done.sort(key=lambda b: b.score(self.params.length_penalty), reverse=True)
        self.done = self.done[:width]
        if not self.live or len(self.live[0].tokens) >= self.params.max_tokens:
            return False
        return not self._can_stop()

    def _beats_done(self, cand: Beam) -> bool:
        return cand.score(self.params.length_penalty) > self.done[-1].score(
            self.params.length_penalty)

    def _can_stop(self) -> bool:
        """Whether the finished beams are final (early_stopping as in HF: True stops once
        beam_width beams finished, "never" runs to max_tokens, False stops when the best live
        beam's score no longer beats the worst finished one)."""
        p = self.params
        if len(self.done) < p.beam_width or p.early_stopping == "never":
            return False
        if p.early_stopping is True:
            return True
        return self.done[-1].score(p.length_penalty) >= self.live[0].score(p.length_penalty)

    def results(self) -> list[Beam]:
        pool = self.done + self.live
        pool.sort(key=lambda b: b.score(self.params.length_penalty), reverse=True)
        return pool[: self.params.beam_width]


def check_beam_search(params: BeamSearchParams, max_logprobs: int) -> None:
    """ValueError for a search the engine cannot run: each step asks for 2 x width logprobs."""
    params.validate()
    width = params.beam_width
    if 2 * width > max_logprobs:
        raise ValueError(f"beam width {width} needs {2 * width} logprobs per step, above "
                         f"max_logprobs {max_logprobs} (--max-logprobs)")


def expansion_params(k: int) -> SamplingParams:
    """The single-token request that scores one beam's next token: its top k logprobs."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True)


def run_beam_search(prompt: list[int], params: BeamSearchParams, eos_ids: set[int],
                    expand: Expand) -> list[Beam]:
    search = _Search(prompt, params, eos_ids)
    while search.advance(expand(search.requests(), 2 * params.beam_width)):
        pass
    return search.results()


async def run_beam_search_async(prompt: list[int], params: BeamSearchParams, eos_ids: set[int],
                                expand: AsyncExpand) -> list[Beam]:
    search = _Search(prompt, params, eos_ids)
    while search.advance(await expand(search.requests(), 2 * params.beam_width)):
        pass
    return search.results()


def top_logprobs_of(entry: dict, k: int) -> dict[int, float]:
    """The k best of one generated token's logprob entry (token id -> Logprob)."""
    items = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
    return {tid: lp.logprob for tid, lp in items if math.isfinite(lp.logprob)}
