"""Data parallelism: N engine replicas behind one server. Each replica is a process running a
whole engine (an ``AsyncLLM``, itself tensor/pipeline parallel if asked); this front end offers
the server the same API as one ``AsyncLLM`` and routes each request to a replica:

- to the replica that last served the same prompt start (its prefix cache likely holds those
  blocks), unless that replica is busier than the least-loaded one by more than PREFIX_SLACK
  requests;
- else to the least loaded: fewest requests in flight, then the lowest KV-cache usage.

Replicas are local processes (``python -m fastllm.engine.data_parallel``), or Ray actors
with --engine-use-ray; either connects back to this process (``procs``) and streams its requests'
chunks (token ids and text: replicas detokenize) and, every STATS_INTERVAL_S, its engine's
counters, which /metrics sums. A replica that exits fails its requests in flight and ends the
server (``wait_dead``), as a dead distributed worker does.

    client ── HTTP ── server process (tokenize, route, metrics) ── conn ──> replica 0 (engine)
                                                                 ── conn ──> replica 1 (engine)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from fastllm.config import EngineArgs
from fastllm.distributed.errors import WorkerError
from fastllm.distributed.procs import (
    STARTUP_TIMEOUT_S,
    Listener,
    child_authkey,
    connect,
    ignore_stop_signals,
    start_child,
)
from fastllm.engine.async_llm import AsyncLLM, served_model_names
from fastllm.engine.errors import RequestFailedError
from fastllm.sampling_params import SamplingParams
from fastllm.tokenizer.tokenizer import LONG_TEXT

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25
# Prompt tokens that key the prefix-aware routing, and how many more requests in flight the
# remembered replica may have than the least-loaded one and still get the request.
PREFIX_TOKENS = 32
PREFIX_SLACK = 2
PREFIX_MEMORY = 4096


# ---- the replica's side ------------------------------------------------------------------------


def replica_main(address, authkey: bytes, index: int) -> None:
    """An engine replica: connects to the front end, builds its engine from the EngineArgs it
    receives, answers ("ready", ModelInfo), then serves requests until told to stop or the
    connection closes."""
    ignore_stop_signals()
    conn = connect(address, authkey, index)
    args = conn.recv()
    logging.basicConfig(level=os.environ.get("FASTLLM_LOGGING_LEVEL", "INFO").upper(),
                        format=f"%(levelname)s %(asctime)s replica {index}: %(message)s")
    try:
        llm = AsyncLLM(args)
    except BaseException as e:  # noqa: BLE001 - the front end reports it
        conn.send(("error", "".join(traceback.format_exception_only(type(e), e)).strip()))
        return
    conn.send(("ready", llm.model_info))
    asyncio.run(_serve_replica(conn, llm))


async def _serve_replica(conn, llm: AsyncLLM) -> None:
    loop = asyncio.get_running_loop()
    llm.start()
    tasks: dict[str, asyncio.Task] = {}
    stopped = asyncio.Event()
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    async def run(request_id, prompt_ids, params, prompt) -> None:
        error = None
        try:
            async for chunk in llm.generate(prompt_ids, params, request_id, prompt):
                send(("chunk", request_id, chunk))
        except RequestFailedError as e:
            error = ("failed", e.error)
        except ValueError as e:
            error = ("invalid", str(e))
        except asyncio.CancelledError:
            error = ("aborted", None)
        finally:
            tasks.pop(request_id, None)
        send(("end", request_id, error))

    def dispatch(message) -> None:
        kind = message[0]
        if kind == "generate":
            _, request_id, prompt_ids, params, prompt = message
            tasks[request_id] = loop.create_task(run(request_id, prompt_ids, params, prompt))
        elif kind == "abort":
            task = tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "abort_all":
            llm.abort_all()
        else:  # "shutdown"
            stopped.set()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("shutdown",)
            loop.call_soon_threadsafe(dispatch, message)
            if message[0] == "shutdown":
                return

    async def report() -> None:
        while True:
            send(("stats", stats_dict(llm.stats())))
            await asyncio.sleep(STATS_INTERVAL_S)

    async def watch_engine() -> None:
        why = await llm.wait_dead()
        send(("dead", why))
        stopped.set()

    threading.Thread(target=read, daemon=True, name="fastllm-replica-read").start()
    background = [loop.create_task(report()), loop.create_task(watch_engine())]
    await stopped.wait()
    for task in [*background, *tasks.values()]:
        task.cancel()
    llm.shutdown()


def stats_dict(stats) -> dict:
    return {name: getattr(stats, name) for name in dir(stats)
            if not name.startswith("_") and isinstance(getattr(stats, name), (int, float))}


# ---- the front end -----------------------------------------------------------------------------


class LocalReplicas:
    """Replicas as processes of this machine."""

    tcp_host = None

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, address, authkey: bytes, count: int) -> None:
        self.procs += [start_child("fastllm.engine.data_parallel", address, authkey, index)
                       for index in range(count)]

    def gone(self) -> str | None:
        for index, proc in enumerate(self.procs):
            if proc.poll() is not None:
                return f"replica {index} (pid {proc.pid}) exited with code {proc.returncode}"
        return None

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


@dataclass
class _Stream:
    """One request in flight (what ServerMetrics reads: arrival, first/last token times)."""

    replica: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0
    finish_reason: str | None = None


class DataParallelLLM:
    """The AsyncLLM API over ``data_parallel_size`` engine replicas (see the module)."""

    def __init__(self, args: EngineArgs, metrics=None, guided_decoding_backend: str | None = None,
                 launcher=None):
        from fastllm.guided import GuidedDecodingManager
        from fastllm.loader import resolve_model
        from fastllm.tokenizer import load_tokenizer

        args.validate()
        t0 = time.perf_counter()
        self.args = args
        self._metrics = metrics
        count = args.data_parallel_size
        # Each replica is one engine; engine_use_ray only says where they run.
        replica_args = replace(args, data_parallel_size=1, engine_use_ray=False)
        if launcher is None:
            if args.engine_use_ray:
                from fastllm.distributed.ray_workers import RayActors

                launcher = RayActors({"CPU": 1}, "fastllm.engine.data_parallel:replica_main")
            else:
                launcher = LocalReplicas()
        self._launcher = launcher
        self._tokenizer = load_tokenizer(args.tokenizer or resolve_model(args.model,
                                                                        args.load_format))
        self._conns = []
        self._dead: str | None = None
        self._dead_event = asyncio.Event()
        self._closing = False
        listener = Listener(launcher.tcp_host)
        try:
            launcher.start(listener.address, listener.authkey, count)
            by_index = listener.accept(count, launcher.gone, STARTUP_TIMEOUT_S)
            self._conns = [by_index[i] for i in range(count)]
            for conn in self._conns:
                conn.send(replica_args)
            infos = [self._ready(i) for i in range(count)]
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()
        self.model_info = replace(infos[0], served_model_names=tuple(served_model_names(args)),
                                  startup_seconds=time.perf_counter() - t0)
        self._guided = GuidedDecodingManager(self._tokenizer, self.model_info.vocab_size,
                                             list(self.model_info.eos_token_ids),
                                             guided_decoding_backend)
        self._stats = [{} for _ in range(count)]
        self._in_flight = [0] * count
        self._streams: dict[str, _Stream] = {}
        self._prefix_owner: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()

    def _ready(self, index: int):
        conn = self._conns[index]
        while not conn.poll(0.5):
            gone = self._launcher.gone()
            if gone:
                raise WorkerError(gone)
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise WorkerError(f"replica {index} exited while it loaded") from None
        if kind != "ready":
            raise ValueError(f"replica {index}: {value}")
        return value

    @property
    def metrics(self):
        return self._metrics

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for index, conn in enumerate(self._conns):
            threading.Thread(target=self._read, args=(index, conn), daemon=True,
                             name=f"fastllm-replica-{index}").start()

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        for conn in self._conns:
            try:
                conn.send(("shutdown",))
            except OSError:
                pass
        self._launcher.wait_exit(10)
        self._launcher.kill()
        for conn in self._conns:
            conn.close()

    @property
    def is_healthy(self) -> bool:
        return self._loop is not None and self._dead is None

    async def wait_dead(self) -> str:
        await self._dead_event.wait()
        return self._dead or "a replica stopped"

    def stats(self):
        """The replicas' engine counters summed (KV usage: their mean)."""
        total: dict = collections.defaultdict(float)
        for stats in self._stats:
            for name, value in stats.items():
                total[name] += value
        out = SimpleNamespace(**{name: int(v) if float(v).is_integer() else v
                                 for name, v in total.items()})
        out.kv_usage = total.get("kv_usage", 0.0) / max(len(self._stats), 1)
        for name in ("num_running", "num_waiting", "num_total_blocks", "num_generated_tokens",
                     "prefix_queries", "prefix_hits", "num_preemptions",
                     "num_prompt_tokens_computed", "spec_draft_tokens", "spec_accepted_tokens",
                     "spec_verify_steps", "spec_draft_seconds", "spec_verify_seconds"):
            if not hasattr(out, name):
                setattr(out, name, 0)
        return out

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- tokenizer (the front end's own copy) -------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < LONG_TEXT:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self._tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict], **kwargs) -> str:
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    # ---- requests ----------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 prompt: str | None = None, lora_request=None):
        params.validate(self.args.max_logprobs, self.model_info.vocab_size)
        if lora_request is not None:
            raise ValueError("this engine serves no LoRA adapters (enable_lora)")
        return self._generate(prompt_token_ids, params, request_id, prompt)

    async def _generate(self, prompt_token_ids, params, request_id, prompt):
        if self._loop is None:
            self.start()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._dead is not None:
            raise RequestFailedError(request_id, f"the engine stopped: {self._dead}")
        index = self._route(prompt_token_ids)
        stream = _Stream(index)
        self._streams[request_id] = stream
        self._in_flight[index] += 1
        if self._metrics is not None:
            self._metrics.on_prompt(len(prompt_token_ids))
            self._metrics.on_routed(index)
        self._send(index, ("generate", request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item[0] == "end":
                    finished = True
                    error = item[1]
                    if error is None or error[0] == "aborted":
                        return
                    if error[0] == "invalid":
                        raise ValueError(error[1])
                    raise RequestFailedError(request_id, error[1])
                yield item[1]
        finally:
            if not finished:
                self._send(index, ("abort", request_id))
                self._end(request_id, "abort")

    def _route(self, prompt_token_ids: list[int]) -> int:
        loads = [(self._in_flight[i], self._stats[i].get("kv_usage", 0.0), i)
                 for i in range(len(self._conns))]
        least = min(loads)
        key = hash(tuple(prompt_token_ids[:PREFIX_TOKENS])) \
            if len(prompt_token_ids) >= PREFIX_TOKENS // 2 else None
        if key is not None:
            owner = self._prefix_owner.get(key)
            if owner is not None and self._in_flight[owner] <= least[0] + PREFIX_SLACK:
                self._prefix_owner.move_to_end(key)
                return owner
            self._prefix_owner[key] = least[2]
            if len(self._prefix_owner) > PREFIX_MEMORY:
                self._prefix_owner.popitem(last=False)
        return least[2]

    def _send(self, index: int, message) -> None:
        try:
            with self._send_lock:
                self._conns[index].send(message)
        except OSError:
            pass  # its reader thread reports the replica gone

    def _end(self, request_id: str, reason: str | None) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._in_flight[stream.replica] -= 1
        if self._metrics is not None:
            self._metrics.on_request_finished(reason, stream, stream.num_tokens)

    # ---- messages from the replicas (asyncio thread) ------------------------------------------

    def _read(self, index: int, conn) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("dead", f"replica {index} exited")
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            loop.call_soon_threadsafe(self._on_message, index, message)
            if message[0] == "dead":
                return

    def _on_message(self, index: int, message) -> None:
        kind = message[0]
        if kind == "chunk":
            _, request_id, chunk = message
            stream = self._streams.get(request_id)
            if stream is None:
                return
            now = time.monotonic()
            new = len(chunk.token_ids)
            if new:
                if self._metrics is not None:
                    self._metrics.on_tokens(stream, now, new)
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.last_token_at = now
                stream.num_tokens += new
            if chunk.finish_reason is not None:
                stream.finish_reason = chunk.finish_reason
            stream.queue.put_nowait(("chunk", chunk))
        elif kind == "end":
            _, request_id, error = message
            stream = self._streams.get(request_id)
            if stream is None:
                return
            reason = "error" if error is not None and error[0] != "aborted" else (
                stream.finish_reason or "abort")
            self._end(request_id, reason)
            stream.queue.put_nowait(("end", error))
        elif kind == "stats":
            self._stats[index] = message[1]
        elif kind == "dead" and not self._closing:
            self._fail(f"{message[1]}")

    def _fail(self, why: str) -> None:
        if self._dead is not None:
            return
        self._dead = why
        logger.error("data-parallel engine stopped: %s", why)
        for request_id in list(self._streams):
            stream = self._streams[request_id]
            self._end(request_id, "error")
            stream.queue.put_nowait(("end", ("failed", f"the engine stopped: {why}")))
        self._dead_event.set()

    # ---- the rest of the engine API ------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        self._send(stream.replica, ("abort", request_id))
        return True

    def abort_all(self) -> int:
        """Every replica ends its requests in flight (each stream gets its "abort" chunks)."""
        for index in range(len(self._conns)):
            self._send(index, ("abort_all",))
        return len(self._streams)

    async def prepare_guided(self, params: SamplingParams) -> None:
        if params.guided_decoding is not None:
            await self._guided.compile_async(params.guided_decoding)

    @property
    def lora_enabled(self) -> bool:
        return False

    def lora_adapters(self) -> dict:
        return {}

    def serve_lora(self, name: str, path: str, base_model_name: str | None = None):
        raise ValueError("this engine serves no LoRA adapters (enable_lora)")

    def unserve_lora(self, name: str) -> None:
        raise KeyError(name)

    # Beam search composes generate() calls: AsyncLLM's, over the replicas.
    beam_search = AsyncLLM.beam_search


if __name__ == "__main__":
    replica_main(sys.argv[1], child_authkey(), int(sys.argv[2]))
