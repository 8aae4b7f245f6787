"""Cost of guided decoding: per-token time of the same batch decoded unguided and guided (a JSON
schema with free-text fields, and a regex of free words), measured in one run on the default
model. Prints ms/token for each and the guided/unguided ratio; asserts nothing.

    python benchmarks/guided_overhead.py [--prompts 8] [--output-len 64] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["title", "summary", "tags", "score"],
}
WORDS_RE = r"([a-z]+ ){1000}"


def run(llm, prompts, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    from fastllm import LLM, SamplingParams
    from fastllm.guided import GuidedDecodingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    llm = LLM(max_model_len=1024)
    prompts = [f"Item {i}: describe a book about {w} as JSON." for i, w in enumerate(
        ["rivers", "stars", "cooking", "chess", "trains", "music", "oceans", "bees"] * 8)]
    prompts = prompts[: args.prompts]
    base = {"temperature": 0.8, "seed": 0, "max_tokens": args.output_len}
    modes = {
        "unguided": SamplingParams(**base, ignore_eos=True),
        "json schema": SamplingParams(**base, guided_decoding=GuidedDecodingParams(json=SCHEMA)),
        "regex": SamplingParams(**base, guided_decoding=GuidedDecodingParams(regex=WORDS_RE)),
    }
    manager = llm.llm_engine.guided
    t0 = time.perf_counter()
    for p in modes.values():
        if p.guided_decoding is not None:
            manager.compile(p.guided_decoding)
    print(f"grammar compile (both, cold, incl. tokenizer build): "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms")
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up

    per_token: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, params in modes.items():
            elapsed, tokens = run(llm, prompts, params)
            ms = 1e3 * elapsed / max(tokens, 1)
            per_token[name] = min(per_token.get(name, float("inf")), ms)
    print(f"{args.prompts} prompts x up to {args.output_len} tokens, best of {args.repeats}")
    for name, ms in per_token.items():
        ratio = ms / per_token["unguided"]
        print(f"  {name:12s} {ms:7.3f} ms/token  ratio vs unguided {ratio:5.2f}x")


if __name__ == "__main__":
    main()
