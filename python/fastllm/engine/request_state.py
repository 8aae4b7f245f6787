"""Per-request text state on the Python side: incremental detokenization, stop strings and
logprobs assembly. Token-level rules stay in the C++ engine."""

from __future__ import annotations

from fastllm.outputs import CompletionOutput, Logprob, RequestOutput
from fastllm.sampling_params import SamplingParams
from fastllm.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                   skip_special_tokens=params.skip_special_tokens,
                                   spaces_between_special_tokens=params.spaces_between_special_tokens)
            if params.detokenize else None
        )
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        # One entry per prompt position (None for the first), filled as prefill chunks run.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self._prompt_sent = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Set when the engine failed the request (finish_reason "error", never sent to clients).
        self.error: str | None = None
        self.num_cached_tokens = 0
        self._max_stop_len = max((len(s) for s in params.stop_strings), default=0)
        # Streaming cursors: how much text / how many tokens and logprobs were handed out.
        self._text_sent = 0
        self._tokens_sent = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error"

    def update(self, out) -> bool:
        """Applies one native output. Returns True when a stop string ended the request here (the
        caller must then abort it in the engine)."""
        self.num_cached_tokens = out.num_cached_tokens
        if self.prompt_logprobs is not None and len(out.prompt_logprobs):
            self._add_prompt_logprobs(out)
        # new_token_ids is a fresh list; the other arrays are numpy views, converted once,
        # never indexed element by element.
        new_ids = out.new_token_ids
        with_logprobs = self.logprobs is not None and len(out.new_logprobs) == len(new_ids)
        stopped_by_string = False
        if self.detokenizer is not None and new_ids:
            if self._max_stop_len and len(new_ids) > 1:
                # Several tokens at once (speculative decoding): check stop strings after each,
                # as one token per output would, and keep none past the one that completed it.
                for i, tok in enumerate(new_ids):
                    new_text = self.detokenizer.step([tok])
                    self.text += new_text
                    if (len(self.token_ids) + i + 1 >= self.params.min_tokens
                            and self._check_stop_strings(len(new_text))):
                        stopped_by_string = True
                        new_ids = new_ids[: i + 1]
                        break
            else:
                new_text = self.detokenizer.step(new_ids)
                self.text += new_text
                if self._max_stop_len and len(self.token_ids) + len(new_ids) >= \
                        self.params.min_tokens:
                    stopped_by_string = self._check_stop_strings(len(new_text))
        self.token_ids.extend(new_ids)
        if with_logprobs:
            k = out.num_top_logprobs
            top_ids, top_values = out.top_token_ids.tolist(), out.top_logprobs.tolist()
            for i, (tok, lp) in enumerate(zip(new_ids, out.new_logprobs.tolist())):
                entry = {tok: Logprob(lp)}
                for j in range(k):
                    entry.setdefault(top_ids[i * k + j], Logprob(top_values[i * k + j], rank=j + 1))
                if self.params.detokenize:
                    for tid, value in entry.items():
                        value.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
                self.logprobs.append(entry)
                self.cumulative_logprob += float(lp)
        if stopped_by_string:
            self.finish_reason = "stop"
            return True
        if out.finished:
            if self.detokenizer is not None:
                self.text += self.detokenizer.flush()
            self.finish_reason = out.finish_reason
            if out.stop_token_id >= 0:
                self.stop_reason = out.stop_token_id
            if out.finish_reason == "error":
                self.error = out.error or "the engine failed the request"
        return False

    def _add_prompt_logprobs(self, out) -> None:
        k = out.num_prompt_top_logprobs
        top_ids, top_values = out.prompt_top_token_ids.tolist(), out.prompt_top_logprobs.tolist()
        for i, lp in enumerate(out.prompt_logprobs.tolist()):
            position = len(self.prompt_logprobs)
            token = self.prompt_token_ids[position]
            entry = {token: Logprob(lp)}
            for j in range(k):
                tid = top_ids[i * k + j]
                value = top_values[i * k + j]
                if tid == token:
                    entry[token].rank = j + 1
                entry.setdefault(tid, Logprob(value, rank=j + 1))
            if self.params.detokenize:
                for tid, value in entry.items():
                    value.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            self.prompt_logprobs.append(entry)

    def take_prompt_logprobs(self) -> list | None:
        """Prompt logprobs not handed out yet (None when the request did not ask)."""
        if self.prompt_logprobs is None:
            return None
        new = self.prompt_logprobs[self._prompt_sent:]
        self._prompt_sent = len(self.prompt_logprobs)
        return new

    def _check_stop_strings(self, new_len: int) -> bool:
        # Only the tail that could contain a stop string touching the new text is searched.
        start = max(0, len(self.text) - new_len - self._max_stop_len + 1)
        best = None
        for stop in self.params.stop_strings:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        self.text = self.text[: idx + len(stop)] if self.params.include_stop_str_in_output \
            else self.text[:idx]
        self.stop_reason = stop
        return True

    def take_delta(self) -> tuple[str, list[int], list[dict[int, Logprob]] | None]:
        """The text, tokens and logprobs not handed out yet. While the request runs, text that
        could still turn out to start a stop string is held back."""
        limit = len(self.text)
        if not self.finished and self._max_stop_len > 1:
            limit = max(self._text_sent, limit - (self._max_stop_len - 1))
        text = self.text[self._text_sent:limit]
        self._text_sent = limit
        tokens = self.token_ids[self._tokens_sent:]
        logprobs = None if self.logprobs is None else self.logprobs[self._tokens_sent:]
        self._tokens_sent = len(self.token_ids)
        return text, tokens, logprobs

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )
