"""User-facing sampling parameters (the offline API and the server share them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastllm import _C


@dataclass
class SamplingParams:
    """How to sample one request. Token-level fields are enforced by the C++ engine and the
    sampling kernel; text-level ones (stop strings, detokenization) by the Python front end.

    Values are checked by :meth:`validate` (called by the engine on every request); a bad value
    raises ``ValueError`` naming the field.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    priority: int = 0
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []

    def validate(self, max_logprobs: int = 20) -> None:
        """Raise ``ValueError`` for values the engine cannot honour."""
        if self.n != 1:
            raise ValueError(f"n={self.n}: parallel sampling (n > 1) is not supported yet")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of}: best_of > 1 is not supported yet")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if not self.detokenize and self.stop_strings:
            raise ValueError("stop strings need detokenize=True")
        self.to_native().validate(max_logprobs)

    def to_native(self) -> _C.SamplingParams:
        """The token-level part, as the C++ engine's SamplingParams."""
        p = _C.SamplingParams()
        p.n = self.n
        p.max_tokens = -1 if self.max_tokens is None else int(self.max_tokens)
        p.min_tokens = int(self.min_tokens)
        p.temperature = float(self.temperature)
        p.top_p = float(self.top_p)
        p.top_k = int(self.top_k)
        p.min_p = float(self.min_p)
        p.presence_penalty = float(self.presence_penalty)
        p.frequency_penalty = float(self.frequency_penalty)
        p.repetition_penalty = float(self.repetition_penalty)
        p.seed = -1 if self.seed is None else int(self.seed)
        p.priority = int(self.priority)
        p.ignore_eos = bool(self.ignore_eos)
        p.stop_token_ids = [int(t) for t in self.stop_token_ids]
        p.logprobs = -1 if self.logprobs is None else int(self.logprobs)
        p.prompt_logprobs = -1 if self.prompt_logprobs is None else int(self.prompt_logprobs)
        return p
