"""User-facing sampling parameters (the offline API and the server share them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastllm import _C
from fastllm.guided.params import GuidedDecodingParams


@dataclass
class SamplingParams:
    """How to sample one request. Token-level fields are enforced by the C++ engine and the
    sampling kernel; text-level ones (stop strings, detokenization) by the Python front end.

    This dataclass is the one table of defaults: the server's request bodies leave unset fields
    to it (tests check that its token-level defaults equal the C++ engine's). Values are checked
    by :meth:`validate`, the one check of a request (the server maps its ``ValueError`` to an
    HTTP 400 with the same message); a bad value raises ``ValueError`` naming the field.
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
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # constrained output (JSON schema, regex, choice, grammar); see fastllm.guided
    guided_decoding: GuidedDecodingParams | None = None
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
        if isinstance(self.guided_decoding, dict):
            self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)

    def validate(self, max_logprobs: int = 20, vocab_size: int = 0) -> None:
        """Raise ``ValueError`` for values the engine cannot honour (token ids are checked
        against vocab_size when it is given)."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n}")
        if self.best_of is not None and (not isinstance(self.best_of, int)
                                         or self.best_of < self.n):
            raise ValueError(f"best_of must be an integer >= n ({self.n}), got {self.best_of}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError("truncate_prompt_tokens must be at least 1")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if not self.detokenize and self.stop_strings:
            raise ValueError("stop strings need detokenize=True")
        # to_native spells "none" as -1, so a negative count must be refused before it gets
        # there (the message is the engine's own for an out-of-range count).
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be in [0, {max_logprobs}], got {value}")
        if self.guided_decoding is not None:
            self.guided_decoding.validate()
        native = self.to_native()
        native.validate(max_logprobs)
        native.check_vocab(vocab_size)

    @property
    def num_samples(self) -> int:
        """Sequences generated for the request: best_of when given, else n."""
        return self.best_of or self.n

    def to_native(self, fan_out: bool = False) -> _C.SamplingParams:
        """The token-level part, as the C++ engine's SamplingParams: of one sequence by default
        (beam search's one-token steps); with ``fan_out`` (what LLMEngine and AsyncLLM send) of
        the whole request, which the engine runs as num_samples child sequences of one request
        (one prefill; outputs carry seq_index; seeded child i uses seed + i; logprobs on when
        best_of must rank the candidates; the contract is in cpp/engine/.../engine.h)."""
        p = _C.SamplingParams()
        p.n = self.num_samples if fan_out else 1
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
        if self.logit_bias:
            p.logit_bias_ids = [int(t) for t in self.logit_bias]
            p.logit_bias_values = [float(v) for v in self.logit_bias.values()]
        if self.allowed_token_ids:
            p.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        p.logprobs = -1 if self.logprobs is None else int(self.logprobs)
        if fan_out and self.num_samples > self.n and self.logprobs is None:
            p.logprobs = 0
        p.prompt_logprobs = -1 if self.prompt_logprobs is None else int(self.prompt_logprobs)
        # A guided request's grammar advances token by token in the logits hook: no drafts.
        p.speculate = self.guided_decoding is None
        return p
