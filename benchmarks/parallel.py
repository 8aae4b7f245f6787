"""Scale-out benchmark on the CPU: what tensor parallelism costs per step, and what data
parallelism gains in throughput.

    python benchmarks/parallel.py [--hidden 512] [--layers 8] [--steps 32] [--clients 32]
                                  [--output-len 64] [--quick]

1. Tensor parallelism: tp=2 (two worker processes, gloo, one thread each) against tp=1 (one
   thread) on the same random fp32 Llama, greedy decode at batch 1 and 32: the mean step time
   of each, and the communication overhead per step, tp2 - tp1 / 2 (the part of a tp=2 step
   that is not the halved compute: per layer two all-reduces of [batch, hidden], one all-gather
   of the logits, the plan's broadcast and the tokens' return).
2. Data parallelism: fastllm-serve with --data-parallel-size 1 and 2 (each replica one thread),
   `clients` concurrent greedy completions of output-len tokens (2 x clients requests): the
   aggregate output tok/s of each and their ratio.

The model is built in a temporary directory (transformers' LlamaConfig with the given size, the
tests' SmolLM2 tokenizer files). Asserts nothing; never run by CI; --quick runs a tiny size to
check the script end to end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "python" / "model_fixtures.py"


def build_model(root: str, hidden: int, layers: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("model_fixtures", MODEL_FIXTURES)
    fixtures = importlib.util.module_from_spec(spec)
    sys.modules["model_fixtures"] = fixtures  # its dataclasses look their module up
    spec.loader.exec_module(fixtures)
    heads = max(2, hidden // 64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 2 * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(2, heads // 4), vocab_size=49152,
        max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.05))
    path = os.path.join(root, "model")
    model.eval().save_pretrained(path, safe_serialization=True)
    fixtures.write_smollm2_tokenizer_files(path, fixtures.default_gguf_path())
    return path


def step_time(model: str, tp: int, batch: int, steps: int) -> float:
    """Mean seconds per decode step at ``batch`` sequences (prefill excluded)."""
    from fastllm import LLM, SamplingParams

    llm = LLM(model=model, tensor_parallel_size=tp, max_model_len=512,
              max_num_seqs=max(batch, 1), enable_prefix_caching=False)
    try:
        prompts = [{"prompt_token_ids": [1, 100 + i, 200 + i, 300 + i]} for i in range(batch)]
        warm = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm.generate(prompts, warm, use_tqdm=False)  # prefill, and first-step costs
        t0 = time.perf_counter()
        llm.generate(prompts, warm, use_tqdm=False)
        prefill = time.perf_counter() - t0
        params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return (time.perf_counter() - t0 - prefill) / steps
    finally:
        llm.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_throughput(model: str, dp: int, clients: int, output_len: int) -> float:
    """Aggregate output tok/s of fastllm-serve --data-parallel-size dp at ``clients``."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTLLM_WORKER_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                             "--host", "127.0.0.1", "--port", str(port), "--model", model,
                             "--data-parallel-size", str(dp), "--max-model-len", "512",
                             "--disable-log-stats", "--disable-log-requests"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dp={dp} server did not start")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)

        def one(i: int) -> int:
            r = httpx.post(f"{base}/v1/completions", timeout=600, json={
                "model": model, "prompt": [1, 100 + i % 997, 7, 9, 11 + i % 13],
                "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))  # warm-up
            t0 = time.perf_counter()
            tokens = sum(pool.map(one, range(2 * clients)))
            return tokens / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a tiny size: checks the script runs")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps, args.clients, args.output_len = 128, 2, 4, 4, 8
    os.environ["FASTLLM_WORKER_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # tp=1 runs in this process, one thread like each tp=2 worker
    with tempfile.TemporaryDirectory() as root:
        model = build_model(root, args.hidden, args.layers)
        print(f"model: hidden {args.hidden}, {args.layers} layers, fp32, CPU, 1 thread per "
              "process")
        print("tensor parallelism (gloo)   batch   tp=1 ms/step   tp=2 ms/step   overhead ms")
        for batch in args.batches:
            t1 = step_time(model, 1, batch, args.steps)
            t2 = step_time(model, 2, batch, args.steps)
            print(f"{'':28}{batch:5d}   {1e3 * t1:12.2f}   {1e3 * t2:12.2f}   "
                  f"{1e3 * (t2 - t1 / 2):11.2f}")
        print("data parallelism           clients   dp=1 tok/s     dp=2 tok/s     ratio")
        r1 = serve_throughput(model, 1, args.clients, args.output_len)
        r2 = serve_throughput(model, 2, args.clients, args.output_len)
        print(f"{'':28}{args.clients:5d}   {r1:12.1f}   {r2:12.1f}   {r2 / r1:7.2f}")


if __name__ == "__main__":
    main()
