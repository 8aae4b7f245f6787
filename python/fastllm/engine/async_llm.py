"""AsyncLLM: the server's front end. The native loop runs on its own thread; its output file
descriptor wakes the asyncio loop, which detokenizes, applies stop strings and fans outputs out to
one queue per request. Nothing here polls or sleeps.

The server talks to this object only: generate / abort, encode / decode / apply_chat_template,
``model_info``, ``stats()``, ``is_healthy``, start / shutdown. Its collaborators (metrics, the
guided-decoding manager) come in through the constructor."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastllm.config import EngineArgs
from fastllm.engine.beam_search import (
    Beam,
    BeamSearchParams,
    check_beam_search,
    expansion_params,
    run_beam_search_async,
    top_logprobs_of,
)
from fastllm.engine.errors import RequestFailedError
from fastllm.engine.llm_engine import (
    DEFAULT_MODEL_NAME,
    EngineCore,
    serve_large_allocations_from_mmap,
)
from fastllm.engine.output_processor import OutputProcessor, RequestGroup, StreamChunk
from fastllm.sampling_params import SamplingParams
from fastllm.tokenizer.tokenizer import LONG_TEXT

logger = logging.getLogger(__name__)

# Part of the server-facing API: the server's process setup and the chunks generate() yields.
__all__ = ["AsyncLLM", "ModelInfo", "StreamChunk", "serve_large_allocations_from_mmap",
           "served_model_names"]


def served_model_names(args: EngineArgs) -> list[str]:
    """The names the model is served under (--served-model-name; the first one labels the
    metrics), known before the engine loads."""
    return list(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])


@dataclass(frozen=True)
class ModelInfo:
    """What a front end needs to know about the loaded model and its engine (read-only)."""

    source_name: str  # the model as given (path, repo id or the default model's name)
    served_model_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # the engine's: the model's and the tokenizer's
    block_size: int
    max_logprobs: int
    startup_seconds: float
    chat_template: str | None  # the tokenizer's own


class _Stream:
    """One request's delivery from the output dispatch to its generator: put() appends a chunk
    (None ends the stream) and wakes the generator waiting in get(). An asyncio.Queue does the
    same in several calls more per chunk; a server makes one chunk per token."""

    __slots__ = ("_items", "_waiter", "arrival", "first_token_at", "group", "last_token_at")

    def __init__(self, group: RequestGroup):
        self.group = group
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: StreamChunk | None) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: the generator was cancelled
            waiter.set_result(None)

    async def get(self) -> StreamChunk | None:
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class AsyncLLM:
    def __init__(self, args: EngineArgs, metrics=None, guided_decoding_backend: str | None = None):
        """metrics: an observer of prompts, tokens and finished requests (the server's
        ServerMetrics), or None. guided_decoding_backend: the default backend of requests that
        name none."""
        # Set (on the asyncio loop) when the engine's distributed workers stop for good.
        self._dead = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A server keeps the process torch-free where the model allows it (see EngineCore).
        self._core = EngineCore(args, on_dead=self._on_engine_dead)
        self.args = args
        self._tokenizer = self._core.tokenizer
        self._tokenizer.byte_pieces()  # built now, not on the first request (tens of ms)
        self._guided = self._core.build_guided_manager(guided_decoding_backend)
        self._metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._processor = OutputProcessor(self._tokenizer, self.abort)
        core = self._core
        self.model_info = ModelInfo(
            source_name=core.source_name, served_model_names=tuple(served_model_names(args)),
            max_model_len=core.max_model_len, vocab_size=core.model_config.vocab_size,
            eos_token_ids=tuple(core.engine_config.eos_token_ids), block_size=core.block_size,
            max_logprobs=args.max_logprobs, startup_seconds=core.startup_seconds,
            chat_template=self._tokenizer.chat_template)

    @property
    def metrics(self):
        """The metrics observer given to the constructor (None without one)."""
        return self._metrics

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the native loop and subscribes the running asyncio loop to its outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._core.native.output_fd, self._on_outputs)
        self._core.native.start()

    def shutdown(self) -> None:
        """Stops the native loop (and the model's workers, if it has any); safe to call again,
        and after the asyncio loop closed."""
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._core.native.output_fd)
            self._loop = None
        self._core.native.stop()
        self._core.shutdown()

    @property
    def is_healthy(self) -> bool:
        """Whether the native loop runs and its executor works (what /health reports)."""
        return self._core.native.is_running and self._core.dead is None

    async def wait_dead(self) -> str:
        """Returns (why) once the engine stopped for good: a distributed worker died. Every
        request in flight has failed by then, and later ones fail."""
        await self._dead.wait()
        return self._core.dead or "the engine stopped"

    def _on_engine_dead(self, message: str) -> None:
        """EngineCore's on_dead (from a watcher or the engine thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_all, message)

    def _fail_all(self, message: str) -> None:
        """Ends every stream in flight with an error (their steps can no longer run)."""
        failed = list(self._streams.items())
        self._streams.clear()
        for request_id, stream in failed:
            self.abort(request_id)
            self._processor.remove(request_id)
            stream.group.error = f"the engine stopped: {message}"
            if self._metrics is not None:
                self._metrics.on_request_finished("error", stream, stream.group.num_output_tokens)
            stream.put(None)
        self._dead.set()

    def stats(self):
        """The native engine's counters (running / waiting requests, KV usage, tokens...)."""
        return self._core.native.stats()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- tokenizer ---------------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenizes a long text on a worker thread (the tokenizer releases the GIL there): a
        very long prompt must not stall the event loop, which delivers every other stream's
        output. A short one is encoded in place, faster than the hop to a thread."""
        if len(text) < LONG_TEXT:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self._tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict], **kwargs) -> str:
        """The prompt text of a conversation (the tokenizer's sandboxed template, or
        ``chat_template=``); ValueError for a template that fails, TypeError for bad
        keyword arguments."""
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    # ---- requests ----------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 prompt: str | None = None, lora_request=None) -> AsyncIterator[StreamChunk]:
        """Yields chunks until the request finishes; each names its child (``index``): an n > 1
        request is one engine request whose children stream side by side. With best_of > n the
        kept n come as one whole chunk each once every candidate finished. Leaving the iteration
        early (a client that went away) aborts the request, which frees its KV blocks.

        The parameters are checked here, when called (ValueError names the problem), so a server
        can answer 400 before a response starts; the engine checks nothing twice."""
        params.validate(self.args.max_logprobs, self.model_info.vocab_size)
        if lora_request is not None and self._core.lora is None:
            raise ValueError("this engine serves no LoRA adapters (enable_lora)")
        return self._generate(prompt_token_ids, params, request_id, prompt, lora_request)

    async def _generate(self, prompt_token_ids: list[int], params: SamplingParams,
                        request_id: str, prompt: str | None,
                        lora_request=None) -> AsyncIterator[StreamChunk]:
        if self._loop is None:
            self.start()
        if request_id in self._streams or request_id in self._processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        guided = None
        if params.guided_decoding is not None:
            # Compiled off the event loop (cached: the server compiles before responding).
            guided = self._guided
            guided.register(request_id, await guided.compile_async(params.guided_decoding),
                            params.num_samples)
        # Loading an adapter reads its files: off the event loop (a no-op once loaded).
        lora_id = (await asyncio.to_thread(self._core.acquire_lora, lora_request)
                   if lora_request is not None else 0)
        try:
            self._core.native.add_request(request_id, prompt_token_ids,
                                          params.to_native(fan_out=True), lora_id=lora_id)
        except BaseException:
            if guided is not None:
                guided.unregister(request_id)
            self._core.release_lora(lora_id)
            raise
        group = self._processor.add_request(request_id, prompt, prompt_token_ids, params,
                                            streaming=True)
        stream = _Stream(group)
        self._streams[request_id] = stream
        if self._metrics is not None:
            self._metrics.on_prompt(len(prompt_token_ids))
        finished = False
        try:
            while True:
                chunk = await stream.get()
                if chunk is None:  # the request is over
                    finished = True
                    if group.failed:
                        raise RequestFailedError(request_id, group.error)
                    return
                yield chunk
        finally:
            if guided is not None:
                guided.unregister(request_id)
            self._core.release_lora(lora_id)
            if not finished:
                self._core.native.abort(request_id)
                self._processor.remove(request_id)
                self._streams.pop(request_id, None)
                if self._metrics is not None:
                    self._metrics.on_request_finished("abort", stream, 0)

    # ---- LoRA adapters served by name -------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        return self._core.lora is not None

    def lora_adapters(self) -> dict:
        """Served adapters: name -> LoRARequest (empty without enable_lora)."""
        return {} if self._core.lora is None else self._core.lora.served()

    def serve_lora(self, name: str, path: str, base_model_name: str | None = None):
        """Loads an adapter under a name (ValueError naming what is wrong; nothing is loaded
        then); returns its LoRARequest."""
        if self._core.lora is None:
            raise ValueError("this engine serves no LoRA adapters (enable_lora)")
        return self._core.lora.serve(name, path, base_model_name)

    def unserve_lora(self, name: str) -> None:
        """Forgets a served adapter: KeyError when unknown, ValueError while requests use it."""
        if self._core.lora is None:
            raise KeyError(name)
        self._core.lora.unserve(name)

    async def beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams,
                          request_id: str, lora_request=None) -> list[Beam]:
        """Beam search for one prompt, best beam first (the offline API runs the same search,
        see fastllm.engine.beam_search). ValueError for a width the engine cannot serve."""
        check_beam_search(params, self.args.max_logprobs)
        counter = iter(range(1 << 62))

        async def score(seq: list[int], k: int) -> dict[int, float]:
            logprobs = []
            async for chunk in self.generate(seq, expansion_params(k),
                                             f"{request_id}-b{next(counter)}",
                                             lora_request=lora_request):
                logprobs += chunk.logprobs or []
            return top_logprobs_of(logprobs[0], k)

        async def expand(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
            return list(await asyncio.gather(*(score(seq, k) for seq in seqs)))

        eos = set(self.model_info.eos_token_ids)
        return await run_beam_search_async(prompt_token_ids, params, eos, expand)

    def abort(self, request_id: str) -> bool:
        self._guided.unregister(request_id)
        return self._core.native.abort(request_id)

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
            self._processor.remove(request_id)
            for index, child in enumerate(group.children):
                if child.finished:
                    continue
                child.finish_reason = "abort"
                if not group.ranked:
                    stream.put(group.chunk(index, child))
            if group.ranked:
                for index, child in group.kept():
                    stream.put(group.chunk(index, child, whole=True))
            if self._metrics is not None:
                self._metrics.on_request_finished("abort", stream, group.num_output_tokens)
            stream.put(None)
        return len(ended)

    async def prepare_guided(self, params: SamplingParams) -> None:
        """Compiles the request's grammar off the event loop (and caches it), so an invalid
        constraint fails before a response starts. ValueError names the problem."""
        if params.guided_decoding is not None:
            await self._guided.compile_async(params.guided_decoding)

    # ---- output dispatch (asyncio thread) ----------------------------------------------------

    def _on_outputs(self) -> None:
        now = time.monotonic()
        for group, chunks in self._processor.process(self._core.native.take_outputs()):
            stream = self._streams.get(group.request_id)
            if stream is None:
                continue
            new_tokens = group.new_tokens
            if new_tokens:
                if self._metrics is not None:
                    self._metrics.on_tokens(stream, now, new_tokens)
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.last_token_at = now
            for chunk in chunks:
                stream.put(chunk)
            if not group.finished:
                continue
            if group.failed:
                logger.error("request %s failed: %s", group.request_id, group.error)
            del self._streams[group.request_id]
            if group.params.guided_decoding is not None:
                self._guided.unregister(group.request_id)
            if self._metrics is not None:
                self._metrics.on_request_finished(group.finish_reason, stream,
                                                 group.num_output_tokens)
            stream.put(None)
