"""One engine's guided decoding: backends, a cache of compiled grammars and the registry the
executor reads. Grammars compile off the engine loop (a small thread pool for the server, the
caller's thread offline) and are cached by (backend, kind, constraint, whitespace pattern).
The front end that owns the engine core builds it (``EngineCore.build_guided_manager``), which
installs its hook on the executor."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from fastllm.guided.backends import BackendSet, CompiledGrammar
from fastllm.guided.hook import GuidedLogitsHook
from fastllm.guided.params import GuidedDecodingParams, normalize_backend
from fastllm.guided.registry import GuidedRegistry

DEFAULT_BACKEND = "guidance"


class GuidedDecodingManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int],
                 default_backend: str | None = None, cache_size: int = 128):
        self.backends = BackendSet(tokenizer, vocab_size, eos_token_ids)
        self.registry = GuidedRegistry(max(int(vocab_size), int(tokenizer.vocab_size)),
                                       eos_token_ids)
        # What the executor calls: only in steps that sample a row of a registered request.
        self.hook = GuidedLogitsHook(self.registry)
        self.default_backend = normalize_backend(default_backend) or DEFAULT_BACKEND
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def backend_name(self, params: GuidedDecodingParams) -> str:
        return normalize_backend(params.backend) or self.default_backend

    def _key(self, params: GuidedDecodingParams) -> tuple:
        return (self.backend_name(params), params.kind(), params.spec(),
                params.whitespace_pattern)

    def compile(self, params: GuidedDecodingParams) -> CompiledGrammar:
        """The compiled grammar (cached). ValueError names a bad constraint or backend."""
        key = self._key(params)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self.backends.get(key[0]).compile(params)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, params: GuidedDecodingParams) -> CompiledGrammar | None:
        with self._lock:
            return self._cache.get(self._key(params))

    async def compile_async(self, params: GuidedDecodingParams) -> CompiledGrammar:
        hit = self.cached(params)
        if hit is not None:
            return hit
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastllm-grammar")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile, params)

    def register(self, request_id: str, compiled: CompiledGrammar, num_children: int = 1) -> None:
        """Registers the request before it is added: one matcher per child sequence (n > 1
        requests fan out in the engine, each child follows the grammar on its own)."""
        self.registry.register(request_id,
                               [compiled.new_matcher() for _ in range(max(1, num_children))])
        self.hook.watch(request_id)

    def unregister(self, request_id: str) -> None:
        self.hook.unwatch(request_id)
        self.registry.unregister(request_id)

