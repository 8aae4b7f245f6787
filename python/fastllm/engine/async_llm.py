"""AsyncLLM: the server's front end. The native loop runs on its own thread; its output file
descriptor wakes the asyncio loop, which detokenizes, applies stop strings and fans outputs out to
one queue per request. Nothing here polls or sleeps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastllm.config import EngineArgs
from fastllm.engine.errors import RequestFailedError
from fastllm.engine.llm_engine import EngineCore
from fastllm.engine.request_state import RequestState
from fastllm.guided import get_manager
from fastllm.outputs import Logprob
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StreamChunk:
    """What one request produced since its previous chunk."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    full_text: str = ""  # all text so far (for non-streaming responses)
    prompt_logprobs: list | None = None  # prompt positions scored since the previous chunk


@dataclass
class _Stream:
    state: RequestState
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None


class AsyncLLM:
    def __init__(self, args: EngineArgs, metrics=None):
        # A server keeps the process torch-free where the model allows it (see EngineCore).
        self.core = EngineCore(args)
        self.args = args
        self.tokenizer = self.core.tokenizer
        self.engine = self.core.engine
        self.metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errored: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the native loop and subscribes the running asyncio loop to its outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.engine.output_fd, self._on_outputs)
        self.engine.start()

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.engine.output_fd)
            self._loop = None
        self.engine.stop()

    @property
    def is_running(self) -> bool:
        return self.engine.is_running and self.errored is None

    # ---- requests ----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[StreamChunk]:
        """Yields chunks until the request finishes. Leaving the iteration early (a client that
        went away) aborts the request, which frees its KV blocks."""
        if self._loop is None:
            self.start()
        params.validate(self.args.max_logprobs)
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer)
        stream = _Stream(state)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        guided = None
        if params.guided_decoding is not None:
            # Compiled off the event loop (cached: the server compiles before responding).
            guided = get_manager(self.core)
            guided.register(request_id, await guided.compile_async(params.guided_decoding))
        try:
            self.engine.add_request(request_id, prompt_token_ids, params.to_native())
        except BaseException:
            if guided is not None:
                guided.unregister(request_id)
            raise
        self._streams[request_id] = stream
        if self.metrics is not None:
            self.metrics.on_prompt(len(prompt_token_ids))
        finished = False
        try:
            while True:
                chunk = await stream.queue.get()
                finished = chunk.finished
                if chunk.finish_reason == "error":
                    raise RequestFailedError(request_id, state.error)
                yield chunk
                if finished:
                    return
        finally:
            if guided is not None:
                guided.unregister(request_id)
            if not finished:
                self.engine.abort(request_id)
                self._streams.pop(request_id, None)
                if self.metrics is not None:
                    self.metrics.on_request_finished("abort", stream, 0)

    def abort(self, request_id: str) -> bool:
        manager = getattr(self.core, "_guided_manager", None)
        if manager is not None:
            manager.unregister(request_id)
        return self.engine.abort(request_id)

    def abort_all(self) -> int:
        """Ends every in-flight request now (a shutdown whose drain deadline passed): each stream
        gets a last chunk with finish_reason "abort", so its client sees a proper ending, and the
        engine frees the request's blocks. Returns how many requests were ended."""
        ended = list(self._streams.items())
        self._streams.clear()
        for request_id, stream in ended:
            self.abort(request_id)
            state = stream.state
            state.finish_reason = "abort"
            text, tokens, logprobs = state.take_delta()
            if self.metrics is not None:
                self.metrics.on_request_finished("abort", stream, len(state.token_ids))
            stream.queue.put_nowait(StreamChunk(
                request_id=request_id, text=text, token_ids=tokens, logprobs=logprobs,
                finished=True, finish_reason="abort", stop_reason=None,
                num_prompt_tokens=len(state.prompt_token_ids),
                num_output_tokens=len(state.token_ids), num_cached_tokens=state.num_cached_tokens,
                full_text=state.text, prompt_logprobs=state.take_prompt_logprobs()))
        return len(ended)

    async def prepare_guided(self, params: SamplingParams) -> None:
        """Compiles the request's grammar off the event loop (and caches it), so an invalid
        constraint fails before a response starts. ValueError names the problem."""
        if params.guided_decoding is not None:
            await get_manager(self.core).compile_async(params.guided_decoding)

    # ---- output dispatch (asyncio thread) ----------------------------------------------------

    def _on_outputs(self) -> None:
        now = time.monotonic()
        for out in self.engine.take_outputs():
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # already ended (stop string or client gone)
            state = stream.state
            if state.update(out):
                self.engine.abort(out.request_id)
            num_new = len(out.new_token_ids)
            if num_new and self.metrics is not None:
                self.metrics.on_tokens(stream, now, num_new)
            if num_new:
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.last_token_at = now
            text, tokens, logprobs = state.take_delta()
            prompt_logprobs = state.take_prompt_logprobs()
            if not (text or tokens or state.finished or prompt_logprobs):
                continue
            chunk = StreamChunk(
                request_id=out.request_id,
                text=text,
                token_ids=tokens,
                logprobs=logprobs,
                finished=state.finished,
                finish_reason=state.finish_reason,
                stop_reason=state.stop_reason,
                num_prompt_tokens=len(state.prompt_token_ids),
                num_output_tokens=len(state.token_ids),
                num_cached_tokens=state.num_cached_tokens,
                full_text=state.text if state.finished else "",
                prompt_logprobs=prompt_logprobs,
            )
            if state.failed:
                logger.error("request %s failed: %s", out.request_id, state.error)
            if state.finished:
                del self._streams[out.request_id]
                if state.params.guided_decoding is not None:
                    get_manager(self.core).unregister(out.request_id)
                if self.metrics is not None:
                    self.metrics.on_request_finished(state.finish_reason, stream,
                                                     len(state.token_ids))
            stream.queue.put_nowait(chunk)
