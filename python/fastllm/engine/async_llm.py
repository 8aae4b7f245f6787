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
from fastllm.engine.output_processor import OutputProcessor, RequestGroup, StreamChunk
from fastllm.guided import get_manager
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    group: RequestGroup
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
        self.processor = OutputProcessor(self.tokenizer, self.abort)
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
        """Yields chunks until the request finishes; each names its child (``index``): an n > 1
        request is one engine request whose children stream side by side. With best_of > n the
        kept n come as one whole chunk each once every candidate finished. Leaving the iteration
        early (a client that went away) aborts the request, which frees its KV blocks."""
        if self._loop is None:
            self.start()
        params.validate(self.args.max_logprobs)
        if request_id in self._streams or request_id in self.processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        guided = None
        if params.guided_decoding is not None:
            # Compiled off the event loop (cached: the server compiles before responding).
            guided = get_manager(self.core)
            guided.register(request_id, await guided.compile_async(params.guided_decoding),
                            params.num_samples)
        try:
            self.engine.add_request(request_id, prompt_token_ids, params.to_native(fan_out=True))
        except BaseException:
            if guided is not None:
                guided.unregister(request_id)
            raise
        group = self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                           streaming=True)
        stream = _Stream(group)
        self._streams[request_id] = stream
        if self.metrics is not None:
            self.metrics.on_prompt(len(prompt_token_ids))
        finished = False
        try:
            while True:
                chunk = await stream.queue.get()
                if chunk is None:  # the request is over
                    finished = True
                    if group.failed:
                        raise RequestFailedError(request_id, group.error)
                    return
                yield chunk
        finally:
            if guided is not None:
                guided.unregister(request_id)
            if not finished:
                self.engine.abort(request_id)
                self.processor.remove(request_id)
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
        gets a last chunk per unfinished child with finish_reason "abort", so its client sees a
        proper ending, and the engine frees the request's blocks. Returns how many requests were
        ended."""
        ended = list(self._streams.items())
        self._streams.clear()
        for request_id, stream in ended:
            self.abort(request_id)
            group = stream.group
            self.processor.remove(request_id)
            for index, child in enumerate(group.children):
                if child.finished:
                    continue
                child.finish_reason = "abort"
                if not group.ranked:
                    stream.queue.put_nowait(group.chunk(index, child))
            if group.ranked:
                for index, child in group.kept():
                    stream.queue.put_nowait(group.chunk(index, child, whole=True))
            if self.metrics is not None:
                self.metrics.on_request_finished("abort", stream, group.num_output_tokens)
            stream.queue.put_nowait(None)
        return len(ended)

    async def prepare_guided(self, params: SamplingParams) -> None:
        """Compiles the request's grammar off the event loop (and caches it), so an invalid
        constraint fails before a response starts. ValueError names the problem."""
        if params.guided_decoding is not None:
            await get_manager(self.core).compile_async(params.guided_decoding)

    # ---- output dispatch (asyncio thread) ----------------------------------------------------

    def _on_outputs(self) -> None:
        now = time.monotonic()
        for group, chunks in self.processor.process(self.engine.take_outputs()):
            stream = self._streams.get(group.request_id)
            if stream is None:
                continue
            new_tokens = group.new_tokens
            if new_tokens:
                if self.metrics is not None:
                    self.metrics.on_tokens(stream, now, new_tokens)
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.last_token_at = now
            for chunk in chunks:
                stream.queue.put_nowait(chunk)
            if not group.finished:
                continue
            if group.failed:
                logger.error("request %s failed: %s", group.request_id, group.error)
            del self._streams[group.request_id]
            if group.params.guided_decoding is not None:
                get_manager(self.core).unregister(group.request_id)
            if self.metrics is not None:
                self.metrics.on_request_finished(group.finish_reason, stream,
                                                 group.num_output_tokens)
            stream.queue.put_nowait(None)
