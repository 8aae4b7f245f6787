"""The torch-free CPU path (models.cpu_model + worker.cpu_runner): on the default quantized model
it must produce exactly what the torch executor with the native decoder produces (tokens,
logprobs, prompt logprobs, across sampling features, guided decoding, prefix-cache hits, chunked
prefill and swap preemption), load the same weights bit for bit, fall back to torch for what it
does not cover, and keep a real server process free of torch."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import openai
import pytest
import torch

from fastllm import _C
from fastllm.config import EngineArgs
from fastllm.engine.llm_engine import LLMEngine
from fastllm.guided import GuidedDecodingParams
from fastllm.loader import dequantize_raw, iterate_gguf_raw, resolve_model
from fastllm.models.cpu_model import load_cpu_model
from fastllm.models.native_cpu import Q7_0X8, Q8_0X8, prepare_cpu_linear
from fastllm.sampling_params import SamplingParams
from fastllm.worker.cpu_runner import CpuExecutor
from test_server import MODEL, start_server, stop_server

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
LONG = ("Write a haiku about the sea, the wind and the long grey afternoons of a northern harbour "
        "town where the boats come home late and the gulls complain about everything.")
REQUESTS = [
    ("The capital of France is",
     SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, prompt_logprobs=2)),
    (LONG, SamplingParams(max_tokens=10, temperature=0.0, prompt_logprobs=0, logprobs=0)),
    (LONG + " Again:", SamplingParams(max_tokens=10, temperature=0.0)),
    ("def fibonacci(n):",
     SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, seed=11,
                    logprobs=2)),
    ("Once upon a time", SamplingParams(max_tokens=12, temperature=1.0, logprobs=1)),
    ("List three colors:",
     SamplingParams(max_tokens=12, temperature=0.7, seed=3, repetition_penalty=1.3,
                    presence_penalty=0.5, frequency_penalty=0.3, logit_bias={28: 4.0})),
    ("Q: What is 12 times 7?\nA:",
     SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, logprobs=1)),
    ("Pick a digit:", SamplingParams(max_tokens=6, temperature=1.0, seed=2,
                                     allowed_token_ids=[32, 33, 34, 35], min_tokens=4)),
    ("Describe a person as JSON.",
     SamplingParams(max_tokens=40, temperature=0.0, guided_decoding=GuidedDecodingParams(
         json=PERSON))),
    ("Call me at", SamplingParams(max_tokens=16, temperature=0.9, seed=4,
                                  guided_decoding=GuidedDecodingParams(regex=r"\d{3}-\d{4}"))),
]


def _engine(torch_free: bool, guided_decoding: bool = True, **kwargs) -> LLMEngine:
    engine = LLMEngine(EngineArgs(**kwargs), torch_free=torch_free,
                       guided_decoding=guided_decoding)
    assert isinstance(engine.core.executor, CpuExecutor) == torch_free
    return engine


def _logprobs(entries) -> list | None:
    if entries is None:
        return None
    return [None if e is None else {t: (lp.logprob, lp.rank) for t, lp in e.items()}
            for e in entries]


def _run(engine: LLMEngine, requests) -> list:
    """Every request in one batch; returns what a caller sees of each (ids, text, logprobs,
    prompt logprobs, finish reason, cached prompt tokens)."""
    ids = [engine.add_request(prompt, dataclasses.replace(params)) for prompt, params in requests]
    outs = engine.run_until_done(ids)
    return [(_logprobs(outs[i].prompt_logprobs), outs[i].num_cached_tokens,
             [(list(c.token_ids), c.text, _logprobs(c.logprobs), c.finish_reason)
              for c in outs[i].outputs]) for i in ids]


def test_torch_free_executor_equals_torch_executor():
    results = {}
    for torch_free in (True, False):
        # Chunks of 24 tokens split the long prompts across steps and mix prefill with decode;
        # the second round finds the prompts in the prefix cache.
        engine = _engine(torch_free, max_model_len=512, max_num_batched_tokens=24, seed=7)
        results[torch_free] = [_run(engine, REQUESTS), _run(engine, REQUESTS)]
    assert results[True] == results[False]
    first, second = results[True]
    assert second[2][1] > 0  # prefix-cache hits
    long_prompt_logprobs = first[1][0]
    assert long_prompt_logprobs[0] is None and len(long_prompt_logprobs) > 30
    assert len(first[6][2]) == 3  # n
    assert set(json.loads(first[8][2][0][1])) == {"name", "age"}


def test_swap_preemption_equals_torch_executor():
    requests = [(f"Story number {i}:", SamplingParams(max_tokens=80, temperature=0.0,
                                                      ignore_eos=True, logprobs=1))
                for i in range(4)]
    results = {}
    for torch_free in (True, False):
        engine = _engine(torch_free, max_model_len=128, num_gpu_blocks_override=24,
                         preemption_mode="swap", swap_space=0.01)
        results[torch_free] = _run(engine, requests)
        assert engine.stats().num_preemptions > 0
    assert results[True] == results[False]


def test_cpu_model_holds_the_torch_models_weights():
    torch_model = _engine(False, max_model_len=256).core.model
    cpu_model = _engine(True, max_model_len=256).core.model
    inner = torch_model.model
    # The RoPE table: one implementation (kernels.rope_cos_sin_cache) behind both, the same bits.
    assert np.array_equal(inner.rope_cache.numpy(), cpu_model.rope_cache)
    assert np.array_equal(inner.norm.weight.numpy(), cpu_model.final_norm)
    assert len(cpu_model.layers) == len(inner.layers) == 30
    for theirs, ours in zip(inner.layers, cpu_model.layers):
        attn, mlp = theirs.self_attn, theirs.mlp
        assert np.array_equal(theirs.input_layernorm.weight.numpy(), ours.input_norm)
        assert np.array_equal(theirs.post_attention_layernorm.weight.numpy(),
                              ours.post_attention_norm)
        for module, (weight, type_id, bias) in zip(
                (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj),
                (ours.qkv, ours.o_proj, ours.gate_up, ours.down)):
            expected, expected_type = prepare_cpu_linear(module.qweight.numpy().copy(),
                                                         module.type_id)
            assert np.array_equal(expected, weight) and expected_type == type_id
            assert module.bias is None and bias is None
    # Tied output projection: one Q8_0x8 copy of the Q8_0 table serves the embedding and the
    # GEMM (without VNNI: a 7-bit copy for the GEMM, the table for the embedding and the
    # refinement); both paths refine the leading logits alike.
    head = torch_model.quant_lm_head
    assert np.array_equal(inner.embed_tokens.qweight.numpy(), cpu_model.embed_table)
    assert np.array_equal(head.qweight.numpy(), cpu_model.lm_head[0])
    assert head.type_id == cpu_model.lm_head[1] == (
        Q7_0X8 if _C.ops.quant_gemm_cpu_isa() == "avx2" else Q8_0X8)
    assert inner.embed_tokens.type_id == cpu_model.embed_type
    assert head.refine_top == cpu_model.lm_head_refine > 0
    assert (head.refine_rows is None) == (cpu_model.refine_rows is None)
    ids = np.array([0, 1, 7042, 49151], dtype=np.int32)
    assert np.array_equal(inner.embed_tokens(torch.from_numpy(ids)).numpy(),
                          cpu_model.embed(ids))


def test_quantized_embedding_rows_equal_the_dequantized_table(default_gguf_path):
    # An untied Q8_0/Q4_0/Q4_1 table is read row by row where the torch model dequantizes it
    # whole: the values must be the same.
    embed = next(t for t in iterate_gguf_raw(default_gguf_path)
                 if t.name == "model.embed_tokens.weight")
    table = dequantize_raw(embed)
    cpu_model = _engine(True, max_model_len=256).core.model
    ids = np.random.default_rng(0).integers(0, table.shape[0], 512).astype(np.int32)
    assert np.array_equal(cpu_model.embed(ids), table[ids])


def test_what_the_cpu_model_does_not_cover_falls_back_to_torch(monkeypatch):
    source = resolve_model(None)
    config = _engine(True, max_model_len=256).core.model_config
    assert load_cpu_model(config, source, "float32", "float16") is not None
    assert load_cpu_model(config, source, "float16", "float16") is None
    assert load_cpu_model(config, source, "float32", "bfloat16") is None
    # A tensor the checkpoint lacks (Q/K/V biases) or an architecture without a native model.
    assert load_cpu_model(dataclasses.replace(config, attention_bias=True), source, "float32",
                          "float16") is None
    assert load_cpu_model(dataclasses.replace(config, architecture="GPT2LMHeadModel"), source,
                          "float32", "float16") is None
    assert not isinstance(LLMEngine(EngineArgs(max_model_len=256, quantized_weights="dequantize"),
                                    torch_free=True).core.executor, CpuExecutor)
    assert not isinstance(LLMEngine(EngineArgs(max_model_len=256, kv_cache_dtype="bfloat16"),
                                    torch_free=True).core.executor, CpuExecutor)
    monkeypatch.setenv("FASTLLM_CPU_NATIVE_DECODER", "0")
    core = LLMEngine(EngineArgs(max_model_len=256), torch_free=True).core
    assert not isinstance(core.executor, CpuExecutor) and core.executor.cpu_decoder is None


def _maps_torch(pid: int) -> bool:
    """Whether the process has libtorch mapped: torch's C++ library is loaded by `import torch`
    and never unloaded."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_server_on_the_default_model_never_imports_torch():
    proc, base = start_server(["--max-model-len", "512", "--disable-log-stats"])
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                        max_tokens=8, temperature=0, logprobs=2,
                                        extra_body={"prompt_logprobs": 1})
        assert "Paris" in out.choices[0].text
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
            max_tokens=40, temperature=0, extra_body={"guided_json": PERSON})
        assert set(json.loads(chat.choices[0].message.content)) == {"name", "age"}
        stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2,
                                           temperature=1.0, seed=1, stream=True)
        assert sum(len(c.choices) for c in stream) >= 2
        assert not _maps_torch(proc.pid)
    finally:
        log = stop_server(proc)
    assert "torch-free executor" in log
    # The same check on a server that runs the torch model does see torch.
    proc, base = start_server(["--max-model-len", "512", "--disable-log-stats",
                               "--quantized-weights", "dequantize"])
    try:
        assert _maps_torch(proc.pid)
    finally:
        stop_server(proc)


def _write_kquant_llama(path: str, source_gguf: str) -> None:
    """A small random Llama in the types of a Q4_K_M file: Q4_K for most linears, Q6_K values,
    down projections and output, float32 norms, the default model's vocabulary."""
    import gguf

    from fastllm.loader import open_gguf
    from test_quantized import random_blocks

    md = open_gguf(source_gguf).metadata
    hidden, inter, layers, vocab = 256, 512, 2, len(md["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(md.get("tokenizer.ggml.pre", "smollm"))
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types([int(t) for t in md["tokenizer.ggml.token_type"]])
    writer.add_token_merges(md["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(61)

    def quant(name, quant_type, rows, cols):
        data = random_blocks(rng, quant_type, rows, cols)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[quant_type])

    quant("token_embd.weight", "Q6_K", vocab, hidden)
    quant("output.weight", "Q6_K", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        quant(f"blk.{i}.attn_q.weight", "Q4_K", hidden, hidden)
        quant(f"blk.{i}.attn_k.weight", "Q4_K", 128, hidden)
        quant(f"blk.{i}.attn_v.weight", "Q6_K", 128, hidden)
        quant(f"blk.{i}.attn_output.weight", "Q4_K", hidden, hidden)
        quant(f"blk.{i}.ffn_gate.weight", "Q4_K", inter, hidden)
        quant(f"blk.{i}.ffn_up.weight", "Q4_K", inter, hidden)
        quant(f"blk.{i}.ffn_down.weight", "Q6_K", hidden, inter)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_kquant_model_runs_on_the_integer_kernels(tmp_path, default_gguf_path):
    """A Q4_K_M-style file keeps the torch-free path: Q4_K layers as repacked Q4_1, the mixed
    Q4_K/Q6_K Q/K/V stacked as Q8_0, Q6_K down projections as Q8_0, the Q6_K output projection as
    Q8_0x8 (Q7_0x8 without VNNI); the torch executor loads the same rows and gives the same tokens
    and logprobs."""
    path = str(tmp_path / "tiny-q4_k_m.gguf")
    _write_kquant_llama(path, default_gguf_path)
    requests = [(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))
                for prompt in ("The capital of France is", "def fibonacci(n):")]
    results = {}
    for torch_free in (True, False):
        engine = _engine(torch_free, model=path, max_model_len=256)
        results[torch_free] = _run(engine, requests)
        if torch_free:
            model = engine.core.model
            layer = model.layers[0]
            assert [lin[1] for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)] == [
                8, 1003, 1003, 8]
            assert model.lm_head[1] == (Q7_0X8 if _C.ops.quant_gemm_cpu_isa() == "avx2"
                                        else Q8_0X8) and model.embed_type is None
    assert results[True] == results[False]
    assert all(len(r[2][0][0]) == 8 for r in results[True])


def test_logits_hook_runs_only_in_steps_with_a_watched_request():
    """The C++ executor calls a Python LogitsHook (through its trampoline) only in steps that
    sample a watched request; the hook's edits of the logits reach the sampler."""

    class ForceToken(_C.models.LogitsHook):
        def __init__(self):
            super().__init__()
            self.target = None
            self.calls = 0
            self.advanced = []

        def apply(self, plan, logits):
            self.calls += 1
            for row, seq in enumerate(plan.sample_seq_indices):
                if plan.request_ids[int(seq)] == self.target:
                    logits[row, :] = -np.inf
                    logits[row, 42] = 0.0

        def advance(self, plan, tokens):
            self.advanced.append(tokens.tolist())

    engine = _engine(True, guided_decoding=False, max_model_len=256)  # the hook slot is ours
    hook = ForceToken()
    engine.core.executor.set_logits_hook(hook)
    with pytest.raises(RuntimeError, match="already set"):
        engine.core.executor.set_logits_hook(ForceToken())
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    free = engine.add_request("Once upon a time", params)
    alone = engine.run_until_done([free])[free].outputs[0].token_ids
    assert hook.calls == 0

    watched = engine.add_request("Once upon a time", params)
    hook.target = watched
    hook.watch(watched)
    other = engine.add_request("Once upon a time", params)
    outs = engine.run_until_done([watched, other])
    assert list(outs[watched].outputs[0].token_ids) == [42] * 4
    assert list(outs[other].outputs[0].token_ids) == list(alone)
    assert hook.calls == 4 and len(hook.advanced) == 4 and all(42 in t for t in hook.advanced)
