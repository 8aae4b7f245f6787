"""Where one decode step's time goes, on the default model: steady-state decode at batch 1 and 32
(every sequence past its prefill), with manual wall-clock timers around the model's pieces.

    python benchmarks/profile_step.py [--batch 1 32] [--steps 40] [--quantized-weights auto]
                                      [--model PATH]

It profiles the executor LLM() picks: the torch-free one for the quantized default model
(FASTLLM_TORCH_FREE=0: the torch model with the native decoder; add FASTLLM_CPU_NATIVE_DECODER=0
for its per-op Python layer loop).

Rows of the table (ms per step, share of the step):
  GEMMs              qkv/o/gate_up/down projections (QuantLinear or nn.Linear)
  lm_head            the output projection of the sampled rows (compute_logits)
  attention          K/V cache write + paged attention
  norms/rope/act     RMSNorm, RoPE, SiLU-and-mul, the embedding lookup
  sampling           the sample kernel and its inputs
  python glue        executor + model code between those (plan -> arrays, layer loop)
  C++ engine         schedule/update/output queue (engine step minus the executor)
  front end          LLMEngine.step's Python output handling (detokenize, stop strings)
Timers cost ~1 us each (~250 a step), counted in the rows they wrap. With the native CPU decoder
(quantized GGUF on the CPU; FASTLLM_CPU_NATIVE_DECODER=0 turns it off) the first four rows come
from the decoder's own C++ timers. The torch-free executor runs the whole step in C++: every row
but the last two comes from its own timers, and "python glue" is then the executor's host time
outside those kernels (block ops, gathers, sampling inputs, result assembly). Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from fastllm import _C, LLM, SamplingParams
from fastllm.worker.cpu_runner import CpuExecutor

TIMES: dict[str, float] = defaultdict(float)


def timed(category: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[category] += time.perf_counter() - t0

    return wrapper


def torch_free_times(executor) -> dict[str, float]:
    """The C++ executor's own timers (seconds since set_profiling(True)) under this file's row
    names."""
    p = executor.profile()
    return {"_execute": p["total"], "GEMMs": p["gemm"], "lm_head": p["lm_head"],
            "attention": p["attention"], "norms/rope/act": p["norms_rope_act"] + p["embed"],
            "sampling": p["sampling"]}


def instrument_torch(executor) -> None:
    """Wrap instance forwards (only this model) and the module-level ops the layers call."""
    import torch

    from fastllm.models import llama
    from fastllm.models.attention import PagedAttention
    from fastllm.models.llama import LlamaForCausalLM, RMSNorm
    from fastllm.models.quant_linear import QuantEmbedding, QuantLinear
    from fastllm.worker import model_runner
    from fastllm.worker.model_runner import ModelExecutor

    model = executor.model
    # The output projection (a QuantLinear, or a torch matmul with the tied embedding) is timed
    # as a whole through compute_logits.
    model.compute_logits = timed("lm_head", model.compute_logits)
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, torch.nn.Linear)) and "lm_head" not in name:
            module.forward = timed("GEMMs", module.forward)
        elif isinstance(module, PagedAttention):
            module.forward = timed("attention", module.forward)
        elif isinstance(module, (RMSNorm, torch.nn.Embedding, QuantEmbedding)):
            module.forward = timed("norms/rope/act", module.forward)
    llama._rotary_embedding = timed("norms/rope/act", llama._rotary_embedding)
    llama._silu_and_mul = timed("norms/rope/act", llama._silu_and_mul)
    # Class-level wraps: the native engine calls execute() through the executor trampoline.
    ModelExecutor.execute = timed("_execute", ModelExecutor.execute)
    model_runner._sample = timed("sampling", model_runner._sample)
    ModelExecutor._sampling_inputs = timed("sampling", ModelExecutor._sampling_inputs)
    LlamaForCausalLM.forward = timed("_model", LlamaForCausalLM.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--quantized-weights", default="auto", choices=["auto", "dequantize"])
    ap.add_argument("--model", default=None,
                    help="a GGUF file or HF directory (default: the default model)")
    args = ap.parse_args()

    llm = LLM(model=args.model, max_model_len=1024, quantized_weights=args.quantized_weights)
    engine = llm.llm_engine
    executor = engine.core.executor
    torch_free = isinstance(executor, CpuExecutor)
    if torch_free:
        decoder = executor  # its profile() covers the decoder's parts and the rest of the step
    else:
        instrument_torch(executor)
        decoder = executor.cpu_decoder
    native = engine.core.native
    engine_step = native.step

    class TimedEngine:
        def __getattr__(self, name):
            return getattr(native, name)

        def step(self):
            t0 = time.perf_counter()
            try:
                return engine_step()
            finally:
                TIMES["_engine"] += time.perf_counter() - t0

    engine.core.native = TimedEngine()
    print(f"threads: fastllm pool {_C.ops.cpu_num_threads()}; weights: "
          f"{args.quantized_weights}; executor: {'C++ CPU' if torch_free else 'torch'}; "
          f"layer loop: {'native CPU decoder' if decoder is not None else 'Python'}")

    prompt = list(range(1000, 1000 + args.prompt_len))
    for batch in args.batch:
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
        for i in range(batch):
            engine.add_request({"prompt_token_ids": [i + 1] + prompt}, params)
        for _ in range(4):  # prefills and the first decode steps
            engine.step()
        TIMES.clear()
        if decoder is not None:
            decoder.set_profiling(True)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        total = (time.perf_counter() - t0) / args.steps * 1e3
        if torch_free:
            for part, seconds in torch_free_times(executor).items():
                TIMES[part] += seconds
            executor.set_profiling(False)
        elif decoder is not None:
            # The native decoder's own timers: its parts run inside one C++ call.
            for key, part in (("gemm", "GEMMs"), ("attention", "attention"),
                              ("norms_rope_act", "norms/rope/act")):
                TIMES[part] += decoder.profile()[key]
            decoder.set_profiling(False)
        per = {k: v / args.steps * 1e3 for k, v in TIMES.items()}
        while engine.has_unfinished_requests():
            engine.step()
        inside = sum(per.get(k, 0.0) for k in ("GEMMs", "attention", "norms/rope/act"))
        rows = [
            ("GEMMs", per.get("GEMMs", 0.0)),
            ("lm_head", per.get("lm_head", 0.0)),
            ("attention", per.get("attention", 0.0)),
            ("norms/rope/act", per.get("norms/rope/act", 0.0)),
            ("sampling", per.get("sampling", 0.0)),
            ("python glue", per.get("_execute", 0.0) - inside - per.get("lm_head", 0.0)
             - per.get("sampling", 0.0)),
            ("C++ engine", per.get("_engine", 0.0) - per.get("_execute", 0.0)),
            ("front end", total - per.get("_engine", 0.0)),
        ]
        print(f"\nbatch {batch}: {total:.2f} ms/step, {batch / total * 1e3:.1f} tok/s "
              f"(context ~{args.prompt_len + 8 + args.steps // 2})")
        print(f"{'part':<16}{'ms/step':>9}{'share':>8}")
        for name, ms in rows:
            print(f"{name:<16}{ms:>9.2f}{ms / total:>8.1%}")


if __name__ == "__main__":
    main()
