"""Serving benchmark: fastllm-serve against llama.cpp's llama-server (and optionally
llama-cpp-python's server) on the same GGUF, measured one server at a time in the same run.

    python benchmarks/serve.py [--llama-server ~/.cache/fastllm-bench/llama-server]
                                 [--llama-cpp-python /path/to/venv/bin/python]
                                 [--clients 1 16 32] [--output-len 128] [--requests 64]

Each server is started as a subprocess on 127.0.0.1 and driven by concurrent streaming OpenAI
Completions clients (asyncio + httpx): greedy, ignore_eos, fixed prompts, `clients` requests in
flight at a time. At 1 client 8 requests run, at c > 1 clients 2 * c requests (32 x 128 tokens at
16 clients, 64 x 128 at 32). Prints per level the aggregate output tok/s and the median time to
first token, TTFT and inter-token latency p50/p99 (`--requests N` sets the request count of every
level above one client), the server's peak RSS (VmHWM of the process tree) after each level and
its time to ready, and fastllm's ratios to each peer (throughput, TTFT, peak RSS at 16 clients).
llama-server runs once per level with as many slots (-np) as clients. Asserts nothing; never run
by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    # Peak RSS (VmHWM of the process tree) read right after each level.
    peak_rss_mb: dict[int, float] = field(default_factory=dict)
    error: str | None = None

    def merge(self, other: Result) -> None:
        self.levels.update(other.levels)
        self.peak_rss_mb.update(other.peak_rss_mb)
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


async def stream_request(client: httpx.AsyncClient, url: str, body: dict) -> Streamed:
    """POST `body` with streaming and usage on, to /v1/completions or /v1/chat/completions."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = timings = None
    gaps: list[float] = []
    parts: list[str] = []
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code >= 400:
            await resp.aread()
            raise httpx.HTTPStatusError(f"HTTP {resp.status_code}: {resp.text[:300]}",
                                        request=resp.request, response=resp)
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            usage = msg.get("usage") or usage
            timings = msg.get("timings") or timings
            for choice in msg.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    chunks += 1
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    prompt_tokens = int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") else None
    return Streamed(tokens, first, gaps, "".join(parts), prompt_tokens, timings)


async def drive(clients: int, jobs: list, handle: Callable[[httpx.AsyncClient, object],
                                                           Awaitable[None]]) -> float:
    """Runs handle(client, job) for every job with `clients` of them in flight at a time, in
    order; returns the wall seconds from the first request to the last response."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await handle(client, job)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - t0


async def run_level(base: str, model: str, clients: int, requests: int,
                    output_len: int) -> Level:
    level = Level(clients, requests)
    url = f"{base}/v1/completions"

    async def handle(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": output_len,
                "temperature": 0.0, "ignore_eos": True}
        out = await stream_request(client, url, body)
        level.tokens += out.tokens
        level.itl.extend(out.gaps)
        if out.ttft is not None:
            level.ttft.append(out.ttft)

    level.seconds = await drive(clients, list(range(requests)), handle)
    return level


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


def bench_server(name: str, cmd: list[str], port: int, model: str, args, env=None,
                 clients_levels: list[int] | None = None) -> Result:
    result = Result(name)
    try:
        with running_server(name, cmd, port, args.ready_timeout, env) as server:
            result.ready_s = server.ready_s
            asyncio.run(run_level(server.base, model, 1, 1, 16))  # warm-up
            for clients in clients_levels or args.clients:
                requests = 8 if clients == 1 else (args.requests or 2 * clients)
                level = asyncio.run(run_level(server.base, model, clients, requests,
                                              args.output_len))
                result.levels[clients] = level
                result.peak_rss_mb[clients] = tree_peak_rss_mb(server.proc.pid)
                print(f"  {clients:>3} clients, {requests:>3} x {args.output_len}: "
                      f"{level.tok_s:8.1f} tok/s, {level.summary()}, peak RSS "
                      f"{result.peak_rss_mb[clients]:.0f} MB", flush=True)
    except (RuntimeError, OSError, httpx.HTTPError) as e:  # reported, not fatal
        result.error = f"{type(e).__name__}: {e}"
        print(f"  failed: {result.error}", flush=True)
    return result


def report(results: list[Result], clients: list[int]) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server")
    ap.add_argument("--llama-cpp-python", default=None,
                    help="python interpreter that has llama-cpp-python[server] installed")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level above one client (default: 2 x clients)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    ap.add_argument("--ctx-per-slot", type=int, default=512)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--fastllm-args", default="", help="extra fastllm-serve flags")
    args = ap.parse_args()

    if args.model is None:
        from fastllm.loader import default_gguf_path

        args.model = default_gguf_path()
    model_name = "bench"
    results: list[Result] = []

    port = free_port()
    cmd = fastllm_command(args.model, port, model_name, 1024, args.fastllm_args.split())
    results.append(bench_server("fastllm", cmd, port, model_name, args,
                                fastllm_env(args.threads)))

    if args.llama_server:
        # One server per level with as many slots (-np) as clients, as llama.cpp is deployed
        # for that load; its peak RSS at 16 clients is that of the 16-slot server.
        merged = Result("llama-server")
        for clients in args.clients:
            port = free_port()
            cmd = llama_server_command(args.llama_server, args.model, port, model_name,
                                       args.threads, clients, args.ctx_per_slot)
            merged.merge(bench_server("llama-server", cmd, port, model_name, args,
                                      clients_levels=[clients]))
        results.append(merged)
    if args.llama_cpp_python:
        port = free_port()
        cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", args.model,
               "--n_threads", str(args.threads), "--n_ctx", "2048", "--host", "127.0.0.1",
               "--port", str(port), "--model_alias", model_name,
               # By default its server cancels the running request when a new one arrives;
               # queueing them is how it serves concurrent clients.
               "--interrupt_requests", "False"]
        results.append(bench_server("llama-cpp-python", cmd, port, model_name, args))
    report(results, args.clients)


if __name__ == "__main__":
    main()
