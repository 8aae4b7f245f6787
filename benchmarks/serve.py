"""Serving benchmark: fastllm-serve against llama.cpp's llama-server (and optionally
llama-cpp-python's server) on the same GGUF, measured one server at a time in the same run.

    python benchmarks/serve.py [--llama-server ~/.cache/fastllm-bench/llama-server]
                                 [--llama-cpp-python /path/to/venv/bin/python]
                                 [--clients 1 16 32] [--output-len 128] [--requests 64]

Each server is started as a subprocess on 127.0.0.1 and driven by concurrent streaming OpenAI
Completions clients (asyncio, a plain HTTP/1.1 connection per request: see StreamClient): greedy,
ignore_eos, fixed prompts, `clients` requests in flight at a time. At 1 client 8 requests run,
at c > 1 clients 2 * c requests (32 x 128 tokens at 16 clients, 64 x 128 at 32). Prints per level the aggregate output tok/s and the median time to
first token, TTFT and inter-token latency p50/p99 (`--requests N` sets the request count of every
level above one client), the server's peak RSS (VmHWM of the process tree) after each level and
its time to ready, and fastllm's ratios to each peer (throughput, TTFT, peak RSS at 16 clients).
llama-server runs once per level with as many slots (-np) as clients. `--rounds R` measures the
whole plan R times, the servers alternating, and reports each level's median round and the
median of the rounds' fastllm / peer ratios (this machine's speed drifts with its neighbours). Asserts nothing; never run
by CI (`--dry-run` prints the servers, their commands and workloads as JSON and starts nothing).

A mixture-of-experts model: benchmarks/make_moe_gguf.py writes a random Mixtral-shaped Q4_0
GGUF (hidden 512, 8 experts top-2, 8 layers) that both servers load; pass it as --model.

    python benchmarks/serve.py --lora [N] [--llama-server PATH] [--clients 16]

measures what serving LoRA adapters costs (N = 4 by default; --clients defaults to 16 here). It
first makes N adapters of the model in a temporary directory, offline, the way the tests do
(tests/python/model_fixtures.py: transformers' fp32 load of the GGUF, PEFT with random A and B
of std 0.05, rank 16, alpha 16, on q/k/v/o/gate/up/down, seeds 0..N-1) and writes adapter 0
also as a GGUF LoRA file. Then, one server at a time:
  fastllm base           fastllm-serve without LoRA;
  fastllm N adapters     fastllm-serve --enable-lora --max-loras N with the N PEFT adapters and
                         the GGUF one: requests round-robin over the N PEFT adapters;
  fastllm 1 adapter      the same server, every request on the GGUF adapter;
  fastllm lora-srv base  the same server, every request on the base model;
  llama-server base      and llama-server --lora GGUF (llama.cpp applies its adapters to every
  llama-server 1 adapter request of the server), -np clients.
It prints the same table, then fastllm 1 adapter / llama-server 1 adapter (the issue's target:
2x or more at 16 clients) and the throughput cost of N adapters against fastllm base (target:
25 % or less). After its timed levels each workload also sends every prompt to each of its
models once more as a chat message (greedy, 32 tokens, stopping at EOS) and the report
compares those texts: every adapter changes them, the GGUF and PEFT forms of adapter 0 agree,
the LoRA server's base texts equal those of the server without LoRA, and how far fastllm agrees
with llama-server, with and without the adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a curious ten-year-old.",
    "List some practical tips for learning a new programming language.",
    "Describe the water cycle and why it matters for agriculture.",
    "What are the main differences between a comet and an asteroid?",
    "Summarize the plot of a heist movie you would like to see.",
    "Give advice to someone running their first marathon.",
    "Explain the difference between weather and climate.",
]


@dataclass
class Level:
    clients: int
    requests: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ttft_p50_ms(self) -> float:
        return percentile(self.ttft, 50) * 1e3

    def summary(self) -> str:
        return (f"TTFT p50 {percentile(self.ttft, 50) * 1e3:7.1f} ms p99 "
                f"{percentile(self.ttft, 99) * 1e3:7.1f} ms, ITL p50 "
                f"{percentile(self.itl, 50) * 1e3:6.1f} ms p99 {percentile(self.itl, 99) * 1e3:6.1f} ms")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Result:
    name: str
    ready_s: float = float("nan")
    levels: dict[int, Level] = field(default_factory=dict)
    # clients -> tok/s of each round (--rounds), in round order
    rounds: dict[int, list[float]] = field(default_factory=dict)
    # Peak RSS (VmHWM of the process tree) read right after each level.
    peak_rss_mb: dict[int, float] = field(default_factory=dict)
    # (model name, prompt index) -> greedy text, from probe_texts.
    texts: dict[tuple[str, int], str] = field(default_factory=dict)
    error: str | None = None

    def merge(self, other: Result) -> None:
        self.levels.update(other.levels)
        self.peak_rss_mb.update(other.peak_rss_mb)
        self.texts.update(other.texts)
        if self.ready_s != self.ready_s:  # nan
            self.ready_s = other.ready_s
        self.error = self.error or other.error

    def rss_at(self, clients: int) -> float:
        return self.peak_rss_mb.get(clients, float("nan"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over the process and its descendants."""
    def hwm(p: int) -> int:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += hwm(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total / 1024


@dataclass
class Streamed:
    """One streamed OpenAI response: completion tokens (usage, else the chunks that carried
    text), time to first text and the gaps between later text chunks, the text itself, and
    llama-server's `timings` object when it sends one."""

    tokens: int
    ttft: float | None
    gaps: list[float]
    text: str
    prompt_tokens: int | None = None
    timings: dict | None = None

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first one per second of streaming them (prefill left out)."""
        span = sum(self.gaps)
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else float("nan")


class StreamClient:
    """The timed load generator's HTTP: one plain asyncio connection per request (HTTP/1.1,
    chunked or length-delimited bodies), each SSE event parsed with json.loads. The client runs
    on the same two cores as the server under test, so its CPU per streamed token comes out of
    the server's: httpx's layers cost about 3x as much per token (measured: ~15 % of a core at
    900 tok/s against ~5 %), a tax that grows with the server's speed."""

    def __init__(self, timeout: float = 600.0):
        self.timeout = timeout

    async def post_stream(self, url: str, body: dict) -> AsyncIterator[tuple[float, bytes]]:
        """POSTs `body` as JSON and yields (arrival time, line) for every line of the response
        body; raises HTTPError for a status of 400 or more."""
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port), self.timeout)
        try:
            payload = json.dumps(body).encode()
            writer.write(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                         .encode() + payload)
            status = await asyncio.wait_for(reader.readline(), self.timeout)
            code = int(status.split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            pending = b""
            async for data in self._body(reader, headers):
                if code >= 400:
                    pending += data
                    continue
                now = time.perf_counter()
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield now, line.rstrip(b"\r")
            if code >= 400:
                raise HTTPError(f"HTTP {code}: {pending[:300].decode(errors='replace')}")
            if pending:
                yield time.perf_counter(), pending.rstrip(b"\r")
        finally:
            writer.close()

    async def _body(self, reader: asyncio.StreamReader, headers: dict) -> AsyncIterator[bytes]:
        async def read(coro):
            return await asyncio.wait_for(coro, self.timeout)

        if headers.get("transfer-encoding") == "chunked":
            while size := int((await read(reader.readline())).split(b";")[0], 16):
                yield await read(reader.readexactly(size))
                await read(reader.readexactly(2))  # the chunk's CRLF
        elif "content-length" in headers:
            yield await read(reader.readexactly(int(headers["content-length"])))
        else:
            while data := await read(reader.read(65536)):
                yield data


class HTTPError(RuntimeError):
    pass


def run_async(coro):
    """asyncio.run on uvloop's event loop where it is installed (a fastllm dependency on Linux):
    the load generator's own CPU per streamed token is then about a third lower."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def stream_request(client: StreamClient, url: str, body: dict) -> Streamed:
    """POST `body` with streaming and usage on, to /v1/completions or /v1/chat/completions."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = timings = None
    gaps: list[float] = []
    parts: list[str] = []
    async for now, line in client.post_stream(url, body):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        msg = json.loads(data)
        usage = msg.get("usage") or usage
        timings = msg.get("timings") or timings
        for choice in msg.get("choices") or []:
            piece = choice.get("text") or (choice.get("delta") or {}).get("content")
            if piece:
                parts.append(piece)
                chunks += 1
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    prompt_tokens = int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") else None
    return Streamed(tokens, first, gaps, "".join(parts), prompt_tokens, timings)


async def drive(clients: int, jobs: list, handle: Callable[[StreamClient, object],
                                                           Awaitable[None]]) -> float:
    """Runs handle(client, job) for every job with `clients` of them in flight at a time, in
    order; returns the wall seconds from the first request to the last response."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    client = StreamClient()

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await handle(client, job)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0


async def run_level(base: str, model: str | list[str], clients: int, requests: int,
                    output_len: int) -> Level:
    """`requests` greedy completions, `clients` at a time; request i asks for model i mod the
    models given (round-robin over adapters) with prompt i mod len(PROMPTS)."""
    models = [model] if isinstance(model, str) else model
    level = Level(clients, requests)
    url = f"{base}/v1/completions"

    async def handle(client: StreamClient, i: int) -> None:
        name, k = models[i % len(models)], i % len(PROMPTS)
        body = {"model": name, "prompt": PROMPTS[k], "max_tokens": output_len,
                "temperature": 0.0, "ignore_eos": True}
        out = await stream_request(client, url, body)
        level.tokens += out.tokens
        level.itl.extend(out.gaps)
        if out.ttft is not None:
            level.ttft.append(out.ttft)

    level.seconds = await drive(clients, list(range(requests)), handle)
    return level


async def probe_texts(base: str, models: list[str], clients: int,
                      max_tokens: int) -> dict[tuple[str, int], str]:
    """Every prompt on every model as a chat message, greedy, up to max_tokens and stopping at
    EOS: texts two servers should agree on. (The timed requests give no such texts: with
    ignore_eos fastllm, like vLLM, goes on past an EOS it sampled, and llama-server never samples
    one; and as raw completions several of these prompts end at once.)"""
    texts: dict[tuple[str, int], str] = {}
    url = f"{base}/v1/chat/completions"

    async def handle(client: StreamClient, job: tuple[str, int]) -> None:
        name, k = job
        body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[k]}],
                "max_tokens": max_tokens, "temperature": 0.0}
        texts[job] = (await stream_request(client, url, body)).text

    await drive(clients, [(m, k) for m in models for k in range(len(PROMPTS))], handle)
    return texts


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


@dataclass
class Server:
    name: str
    base: str
    proc: subprocess.Popen
    log_path: str
    ready_s: float


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it was started in its own session), SIGKILL when
    it has not exited 20 s later."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def running_server(name: str, cmd: list[str], port: int, ready_timeout: float,
                   env: dict | None = None) -> Iterator[Server]:
    """Starts `cmd` (a server listening on 127.0.0.1:port) with its output in a temporary log,
    waits until /v1/models answers, and stops it on leaving. Raises RuntimeError when it exits
    or is not ready in time."""
    base = f"http://127.0.0.1:{port}"
    fd, log_path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
    print(f"\n== {name}: {' '.join(cmd)}  (log: {log_path})", flush=True)
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        ready_s = wait_ready(base, proc, ready_timeout)
        yield Server(name, base, proc, log_path, ready_s)
    finally:
        stop_server(proc)


def fastllm_command(model: str, port: int, model_name: str, max_model_len: int = 1024,
                    extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    serve = shutil.which("fastllm-serve")
    return ([serve] if serve else [sys.executable, "-m", "fastllm.entrypoints.cli"]) + [
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), "--served-model-name", model_name,
        "--disable-log-stats", "--disable-log-requests", *extra]


def fastllm_env(threads: int) -> dict[str, str]:
    return dict(os.environ, FASTLLM_CPU_THREADS=str(threads))


def llama_server_command(binary: str, model: str, port: int, model_name: str, threads: int,
                         slots: int, ctx_per_slot: int,
                         extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """llama-server with `slots` parallel sequences (-np) sharing a context of
    slots x ctx_per_slot tokens."""
    return [os.path.expanduser(binary), "-m", model, "-t", str(threads), "-np", str(slots),
            "-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port),
            "--alias", model_name, *extra]


@dataclass
class Workload:
    """What one result measures on a running server: requests round-robin over `models`."""

    name: str
    models: list[str]


@dataclass
class ServerRun:
    """One server of the plan and the workloads measured on it, in order. A per-level server
    (llama-server) is started once per clients level with that many slots; the others once
    for all levels."""

    name: str
    command: Callable[[int, int], list[str]]  # (port, clients) -> argv
    workloads: list[Workload]
    per_level: bool = False
    env: dict[str, str] | None = None
    probe_tokens: int = 0  # > 0: probe_texts after the levels, at the highest one

    def level_groups(self, clients: list[int]) -> list[list[int]]:
        return [[c] for c in clients] if self.per_level else [clients]


def bench_server(name: str, cmd: list[str], port: int, workloads: list[Workload], args,
                 env=None, clients_levels: list[int] | None = None,
                 probe_tokens: int = 0) -> list[Result]:
    """Starts one server and measures each workload at each clients level on it (then, with
    probe_tokens, collects its texts); one Result per workload. A server that fails is reported
    in every Result, not raised."""
    results = [Result(w.name) for w in workloads]
    try:
        with running_server(name, cmd, port, args.ready_timeout, env) as server:
            for w, result in zip(workloads, results):
                result.ready_s = server.ready_s
                # Warm-up, one request per model: adapters are loaded before the clock starts.
                for model in w.models:
                    run_async(run_level(server.base, model, 1, 1, 16))
                for clients in clients_levels or args.clients:
                    requests = 8 if clients == 1 else (args.requests or 2 * clients)
                    level = run_async(run_level(server.base, w.models, clients, requests,
                                                  args.output_len))
                    result.levels[clients] = level
                    result.peak_rss_mb[clients] = tree_peak_rss_mb(server.proc.pid)
                    print(f"  {w.name}: {clients:>3} clients, {requests:>3} x "
                          f"{args.output_len}: {level.tok_s:8.1f} tok/s, {level.summary()}, "
                          f"peak RSS {result.peak_rss_mb[clients]:.0f} MB", flush=True)
                if probe_tokens:
                    result.texts = run_async(probe_texts(
                        server.base, w.models, max(clients_levels or args.clients),
                        probe_tokens))
    except (RuntimeError, OSError, httpx.HTTPError) as e:  # reported, not fatal
        error = f"{type(e).__name__}: {e}"
        print(f"  failed: {error}", flush=True)
        for result in results:
            result.error = result.error or error
    return results


def run_plan(runs: list[ServerRun], args) -> dict[str, Result]:
    """Every server of the plan, one at a time, args.rounds times over (the servers alternate:
    on a machine whose speed drifts, one round's servers are the comparable set); the Results by
    workload name, each level the round of median throughput, with every round's in `rounds`."""
    rounds: list[dict[str, Result]] = []
    for k in range(args.rounds):
        if k:
            print(f"\n-- round {k + 1}", flush=True)
        results: dict[str, Result] = {}
        for run in runs:
            for levels in run.level_groups(args.clients):
                port = free_port()
                probe = run.probe_tokens if max(levels) == max(args.clients) and not k else 0
                for r in bench_server(run.name, run.command(port, max(levels)), port,
                                      run.workloads, args, run.env, levels, probe):
                    results.setdefault(r.name, Result(r.name)).merge(r)
        rounds.append(results)
    return merge_rounds(rounds)


def merge_rounds(rounds: list[dict[str, Result]]) -> dict[str, Result]:
    merged = rounds[0]
    for name, result in merged.items():
        for c in list(result.levels):
            levels = [r[name].levels[c] for r in rounds if c in r[name].levels]
            result.rounds[c] = [lv.tok_s for lv in levels]
            result.levels[c] = sorted(levels, key=lambda lv: lv.tok_s)[(len(levels) - 1) // 2]
        for r in rounds[1:]:
            result.error = result.error or r[name].error
    return merged


def plan_json(runs: list[ServerRun], args) -> dict:
    return {"clients": args.clients, "servers": [
        {"name": run.name, "workloads": {w.name: w.models for w in run.workloads},
         "commands": {str(max(levels)): run.command(8000, max(levels))
                      for levels in run.level_groups(args.clients)}} for run in runs]}


def print_table(results: list[Result], clients: list[int]) -> None:
    rss_level = 16 if 16 in clients else clients[-1]
    print("\n| server | " + " | ".join(f"{c} cl tok/s | {c} cl TTFT p50 ms" for c in clients)
          + f" | peak RSS MB ({rss_level} cl) | ready s |")
    print("|---" * (2 * len(clients) + 3) + "|")
    for r in results:
        cells = []
        for c in clients:
            lv = r.levels.get(c)
            cells += [f"{lv.tok_s:.1f}", f"{lv.ttft_p50_ms:.0f}"] if lv else ["-", "-"]
        print(f"| {r.name} | " + " | ".join(cells) +
              f" | {r.rss_at(rss_level):.0f} | {r.ready_s:.1f} |")


def report(results: list[Result], clients: list[int]) -> None:
    print_table(results, clients)
    rss_level = 16 if 16 in clients else clients[-1]
    ours = results[0]
    for peer in results[1:]:
        if peer.error:
            continue
        ratios, ttfts = [], []
        for c in clients:
            a, b = ours.levels.get(c), peer.levels.get(c)
            if a and b and b.tok_s:
                ratios.append(f"{c} clients {a.tok_s / b.tok_s:.2f}x")
                ttfts.append(f"{c} clients {a.ttft_p50_ms / b.ttft_p50_ms:.2f}x")
        rss = ours.rss_at(rss_level) / peer.rss_at(rss_level)
        print(f"fastllm / {peer.name}: throughput " + ", ".join(ratios) +
              "; TTFT p50 " + ", ".join(ttfts) + f"; peak RSS at {rss_level} clients {rss:.2f}x")
        for c in clients:
            a, b = ours.rounds.get(c, []), peer.rounds.get(c, [])
            if len(a) > 1 and len(a) == len(b) and all(b):
                per = [x / y for x, y in zip(a, b)]
                print(f"  {c} clients, round by round: " +
                      ", ".join(f"{x:.1f} / {y:.1f} = {r:.2f}x" for x, y, r in zip(a, b, per)) +
                      f"; median of the rounds' ratios {statistics.median(per):.2f}x")


# ---- --lora -------------------------------------------------------------------------------

# The adapters --lora makes: PEFT rank 16 on every supported projection, scaling alpha / rank
# = 1, A and B ~ N(0, 0.05): large enough to change the text, small enough to keep it text.
LORA_RANK, LORA_ALPHA, LORA_STD = 16, 16, 0.05
GGUF_ADAPTER = "lora0-gguf"  # the served name of adapter 0's GGUF form
PROBE_TOKENS = 32  # length of the texts compared across servers
MODEL_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "python" / "model_fixtures.py"


def load_model_fixtures() -> ModuleType:
    """tests/python/model_fixtures.py, which builds the tests' adapters, imported by path."""
    spec = importlib.util.spec_from_file_location("model_fixtures", MODEL_FIXTURES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_lora_adapters(model: str, directory: str, n: int) -> tuple[list[str], str]:
    """N PEFT adapters of the GGUF `model` under `directory` and adapter 0 as a GGUF LoRA file
    (about 20 s, most of it transformers dequantizing the GGUF); their paths."""
    fixtures = load_model_fixtures()
    reference = fixtures.load_hf_reference(model).model
    paths = [os.path.join(directory, f"lora{i}") for i in range(n)]
    for seed, path in enumerate(paths):
        fixtures.make_peft_adapter(reference, path, LORA_RANK, LORA_ALPHA, fixtures.LORA_TARGETS,
                                   seed=seed, std=LORA_STD)
    gguf_path = os.path.join(directory, "lora0.gguf")
    cfg = reference.config
    fixtures.write_gguf_adapter(paths[0], gguf_path, cfg.num_attention_heads,
                                cfg.num_key_value_heads)
    return paths, gguf_path


def lora_plan(args, model_name: str, peft_paths: list[str], gguf_path: str) -> list[ServerRun]:
    n = len(peft_paths)
    adapters = [f"lora{i}" for i in range(n)]
    extra = args.fastllm_args.split()
    lora_flags = ["--enable-lora", "--max-loras", str(n), "--max-lora-rank", str(LORA_RANK),
                  "--lora-modules", *(f"{a}={p}" for a, p in zip(adapters, peft_paths)),
                  f"{GGUF_ADAPTER}={gguf_path}"]
    env = fastllm_env(args.threads)
    runs = [
        ServerRun("fastllm", lambda port, _: fastllm_command(args.model, port, model_name, 1024,
                                                             extra),
                  [Workload("fastllm base", [model_name])], env=env, probe_tokens=PROBE_TOKENS),
        ServerRun("fastllm-lora",
                  lambda port, _: fastllm_command(args.model, port, model_name, 1024,
                                                  [*lora_flags, *extra]),
                  [Workload(f"fastllm {n} adapters", adapters),
                   Workload("fastllm 1 adapter", [GGUF_ADAPTER]),
                   Workload("fastllm lora-srv base", [model_name])], env=env,
                  probe_tokens=PROBE_TOKENS)]
    if args.llama_server:
        def llama(lora: list[str]) -> Callable[[int, int], list[str]]:
            return lambda port, clients: llama_server_command(
                args.llama_server, args.model, port, model_name, args.threads, clients,
                args.ctx_per_slot, lora)

        runs += [ServerRun("llama-server", llama([]),
                           [Workload("llama-server base", [model_name])], per_level=True,
                           probe_tokens=PROBE_TOKENS),
                 ServerRun("llama-server-lora", llama(["--lora", gguf_path]),
                           [Workload("llama-server 1 adapter", [model_name])], per_level=True,
                           probe_tokens=PROBE_TOKENS)]
    return runs


def compare_texts(a: dict[tuple[str, int], str], b: dict[tuple[str, int], str], model_a: str,
                  model_b: str) -> tuple[int, int, int]:
    """(identical, compared, median common prefix in characters) of model_a's texts in a and
    model_b's in b, prompt by prompt."""
    same = total = 0
    prefixes = []
    for (model, k), text in sorted(a.items()):
        other = b.get((model_b, k))
        if model != model_a or other is None:
            continue
        total += 1
        same += text == other
        prefixes.append(len(os.path.commonprefix([text, other])))
    return same, total, int(percentile(prefixes, 50)) if prefixes else 0


def report_lora(results: dict[str, Result], clients: list[int], n: int,
                model_name: str) -> None:
    print_table(list(results.values()), clients)

    def ratio(num: str, den: str, c: int) -> float | None:
        a, b = (results[x].levels.get(c) if x in results else None for x in (num, den))
        return a.tok_s / b.tok_s if a and b and a.tok_s and b.tok_s else None

    print()
    for c in clients:
        # (numerator, denominator, target): within one engine a ratio below 1 is also a cost.
        checks = [
            ("fastllm 1 adapter", "llama-server 1 adapter", "target >= 2x"),
            (f"fastllm {n} adapters", "fastllm base", "target: cost <= 25 %"),
            ("fastllm 1 adapter", "fastllm base", ""),
            ("fastllm lora-srv base", "fastllm base", ""),
            ("fastllm base", "llama-server base", ""),
            ("llama-server 1 adapter", "llama-server base", ""),
        ]
        for num, den, target in checks:
            r = ratio(num, den, c)
            if r is None:
                continue
            same_engine = num.split()[0] == den.split()[0]
            cost = f" (cost {100 * (1 - r):.1f} %)" if same_engine and r <= 1 else ""
            note = f"  [{target}]" if target else ""
            print(f"{c} clients: {num} / {den}: {r:.2f}x{cost}{note}")

    # Greedy texts (probe_texts): every adapter must change them; the two forms of adapter 0,
    # and the base with and without LoRA on, must give the same texts. llama-server's agreement
    # is informational (another engine's rounding): its base pair is the control for its
    # adapter pair.
    def texts(name: str) -> dict[tuple[str, int], str]:
        return results[name].texts if name in results else {}

    print(f"\ngreedy texts of the {len(PROMPTS)} prompts, {PROBE_TOKENS} tokens at most, "
          f"{max(clients)} clients:")
    base, mixed, gguf = texts("fastllm base"), texts(f"fastllm {n} adapters"), \
        texts("fastllm 1 adapter")
    for i in range(n):
        same, total, _ = compare_texts(mixed, base, f"lora{i}", model_name)
        if total:
            print(f"  lora{i} vs fastllm base: {total - same}/{total} changed by the adapter")
    pairs = [
        ("fastllm 1 adapter (GGUF) vs lora0 (PEFT)", gguf, mixed, GGUF_ADAPTER, "lora0"),
        ("fastllm lora-srv base vs fastllm base", texts("fastllm lora-srv base"), base,
         model_name, model_name),
        ("fastllm base vs llama-server base", base, texts("llama-server base"), model_name,
         model_name),
        ("fastllm 1 adapter vs llama-server 1 adapter", gguf, texts("llama-server 1 adapter"),
         GGUF_ADAPTER, model_name),
    ]
    for label, a, b, model_a, model_b in pairs:
        same, total, prefix = compare_texts(a, b, model_a, model_b)
        if total:
            print(f"  {label}: {same}/{total} identical, median common prefix {prefix} chars")


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server")
    ap.add_argument("--llama-cpp-python", default=None,
                    help="python interpreter that has llama-cpp-python[server] installed")
    ap.add_argument("--lora", type=int, nargs="?", const=4, default=0, metavar="N",
                    help="the LoRA benchmark with N adapters (default 4)")
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="concurrency levels (default: 1 16 32; 16 with --lora)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level above one client (default: 2 x clients)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every server this many times, alternating (reports the median)")
    ap.add_argument("--ctx-per-slot", type=int, default=512)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--fastllm-args", default="", help="extra fastllm-serve flags")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the servers, commands and workloads as JSON; start nothing")
    args = ap.parse_args(argv)
    if args.lora < 0:
        ap.error("--lora N needs N >= 1")
    if args.lora and args.llama_cpp_python:
        ap.error("--lora compares against llama-server only (no --llama-cpp-python)")
    if args.clients is None:
        args.clients = [16] if args.lora else [1, 16, 32]
    if min(args.clients) < 1 or args.output_len < 1 or args.requests < 0 or args.rounds < 1:
        ap.error("--clients and --output-len must be positive")
    return args


def plain_plan(args, model_name: str) -> list[ServerRun]:
    runs = [ServerRun("fastllm", lambda port, _: fastllm_command(
        args.model, port, model_name, 1024, args.fastllm_args.split()),
        [Workload("fastllm", [model_name])], env=fastllm_env(args.threads))]
    if args.llama_server:
        # One server per level with as many slots (-np) as clients, as llama.cpp is deployed
        # for that load; its peak RSS at 16 clients is that of the 16-slot server.
        runs.append(ServerRun("llama-server", lambda port, clients: llama_server_command(
            args.llama_server, args.model, port, model_name, args.threads, clients,
            args.ctx_per_slot), [Workload("llama-server", [model_name])], per_level=True))
    if args.llama_cpp_python:
        runs.append(ServerRun("llama-cpp-python", lambda port, _: [
            args.llama_cpp_python, "-m", "llama_cpp.server", "--model", args.model,
            "--n_threads", str(args.threads), "--n_ctx", "2048", "--host", "127.0.0.1",
            "--port", str(port), "--model_alias", model_name,
            # By default its server cancels the running request when a new one arrives;
            # queueing them is how it serves concurrent clients.
            "--interrupt_requests", "False"], [Workload("llama-cpp-python", [model_name])]))
    return runs


def resolve_model(args: argparse.Namespace) -> None:
    """--model defaults to the embedded SmolLM2 GGUF (a placeholder in a dry run, which loads
    nothing)."""
    if args.model is None:
        if args.dry_run:
            args.model = "MODEL.gguf"
        else:
            from fastllm.loader import default_gguf_path

            args.model = default_gguf_path()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve_model(args)
    model_name = "bench"
    if args.dry_run:
        runs = (lora_plan(args, model_name, [f"ADAPTERS/lora{i}" for i in range(args.lora)],
                          "ADAPTERS/lora0.gguf") if args.lora else plain_plan(args, model_name))
        json.dump(plan_json(runs, args), sys.stdout, indent=1)
        print()
        return
    if not args.lora:
        runs = plain_plan(args, model_name)
        results = run_plan(runs, args)
        report([results[w.name] for run in runs for w in run.workloads], args.clients)
        return
    with tempfile.TemporaryDirectory(prefix="fastllm-lora-bench-") as directory:
        t0 = time.perf_counter()
        peft_paths, gguf_path = make_lora_adapters(args.model, directory, args.lora)
        print(f"made {args.lora} PEFT adapters (rank {LORA_RANK}, alpha {LORA_ALPHA}, std "
              f"{LORA_STD}) and {os.path.basename(gguf_path)} in {directory} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        runs = lora_plan(args, model_name, peft_paths, gguf_path)
        results = run_plan(runs, args)
    report_lora(results, args.clients, args.lora, model_name)


if __name__ == "__main__":
    main()
