"""Does one very long prompt stall the other streams? Runs fastllm-serve on the default model,
keeps 16 streaming completions running and measures their inter-token latency (ITL) p50/p99
twice: alone (baseline), and while other clients keep submitting a ~32k-token prompt (tokenized
by the server; it is then refused for its length, so only the front end's work on it counts).
Prints both and their ratio; the front end must keep the p99 within 2x of the baseline.

    python benchmarks/long_prompt_stall.py [--streams 16] [--long-tokens 32000] [--rounds 3]

Asserts nothing; never run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), "--disable-log-requests", "--disable-log-stats",
           "--max-model-len", "2048", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def stream_itl(client: httpx.AsyncClient, index: int, tokens: int, gaps: list[float]):
    body = {"model": MODEL, "prompt": f"Story number {index}: once upon a time",
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    last = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now


async def long_prompts(client: httpx.AsyncClient, text: str, stop: asyncio.Event,
                       sent: list[int]):
    while not stop.is_set():
        await client.post("/v1/completions", json={"model": MODEL, "prompt": text,
                                                   "max_tokens": 1})
        sent[0] += 1


async def measure(base: str, streams: int, tokens: int, long_text: str | None
                  ) -> tuple[list[float], int]:
    gaps: list[float] = []
    sent = [0]
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        background = None
        runs = [asyncio.ensure_future(stream_itl(client, i, tokens, gaps))
                for i in range(streams)]
        if long_text is not None:
            await asyncio.sleep(1.0)  # the streams are decoding
            background = asyncio.ensure_future(long_prompts(client, long_text, stop, sent))
        await asyncio.gather(*runs)
        stop.set()
        if background is not None:
            await background
    return gaps, sent[0]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--long-tokens", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    proc = start_server(port)
    base = f"http://127.0.0.1:{port}"
    # ~4 tokens per word for this text with the default tokenizer
    long_text = " ".join(f"word{i % 997}" for i in range(args.long_tokens // 4))
    count = httpx.post(f"{base}/tokenize", json={"prompt": long_text}, timeout=600).json()["count"]
    print(f"long prompt: {count} tokens")
    try:
        for r in range(args.rounds):
            base_gaps, _ = asyncio.run(measure(base, args.streams, args.tokens, None))
            load_gaps, sent = asyncio.run(measure(base, args.streams, args.tokens, long_text))
            b50, b99 = pct(base_gaps, 50) * 1e3, pct(base_gaps, 99) * 1e3
            l50, l99 = pct(load_gaps, 50) * 1e3, pct(load_gaps, 99) * 1e3
            print(f"round {r}: ITL p50/p99 alone {b50:.1f}/{b99:.1f} ms, with long prompts "
                  f"{l50:.1f}/{l99:.1f} ms ({sent} submitted); p99 ratio {l99 / b99:.2f}x")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
