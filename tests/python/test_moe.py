"""Mixture-of-experts models end to end: a tiny random Mixtral and Qwen3-MoE (6 experts top-2,
GQA, odd vocabulary) against HF transformers fp32, greedy, through chunked prefill and
preemption; from safetensors and from an F32 GGUF on the torch executor; from Q8_0 / Q4_0 GGUFs
with the experts kept quantized, where the torch-free native executor and the torch executor
(with its native decoder) give the same tokens and logprobs and the perplexity of a fixed text
stays within 1 % of fp32's."""

from __future__ import annotations

import math

import pytest
import torch

import model_fixtures
from fastllm import LLM, SamplingParams
from fastllm.config import ModelConfig
from fastllm.models import get_model_class
from test_llm import hf_greedy, hf_token_logprobs

NEW_TOKENS = 64
PROMPTS = [[1, 5, 9, 200, 3000, 47], list(range(100, 160)), [40000, 2, 2, 7],
           list(range(5000, 5090, 3))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion about the costs of the new library, the members agreed to postpone the "
        "decision until the engineers had finished their report on the old building's roof.")


@pytest.fixture(scope="module")
def hf_model(tiny_moe_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_outputs(hf_model) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in PROMPTS]


def _check_greedy(llm: LLM, hf_model, hf_outputs) -> None:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for p, out, ref in zip(PROMPTS, outs, hf_outputs):
        comp = out.outputs[0]
        assert comp.token_ids == ref
        ours = torch.tensor([d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)])
        theirs = hf_token_logprobs(hf_model, p, comp.token_ids)
        assert torch.allclose(ours, theirs, atol=1e-3), (ours - theirs).abs().max()


def _preempting_llm(model: str) -> LLM:
    # Chunks of 24 tokens split the prompts across steps; 17 usable blocks of 16 tokens hold one
    # request of max_model_len but not the batch, so requests are preempted and recomputed.
    return LLM(model=model, max_model_len=256, max_num_batched_tokens=24, block_size=16,
               num_gpu_blocks_override=18, enable_prefix_caching=False)


def test_safetensors_matches_hf(tiny_moe_dir, hf_model, hf_outputs):
    llm = _preempting_llm(tiny_moe_dir)
    assert type(llm.llm_engine.core.model).__name__ == "MoeForCausalLM"
    _check_greedy(llm, hf_model, hf_outputs)
    assert llm.llm_engine.stats().num_preemptions > 0


@pytest.fixture(scope="module")
def gguf_paths(tiny_moe_dir, default_gguf_path) -> dict[str, str]:
    kind = "mixtral" if "mixtral" in tiny_moe_dir else "qwen3_moe"
    return {q: model_fixtures.build_tiny_moe_gguf(tiny_moe_dir, kind, q, default_gguf_path)
            for q in ("F32", "Q8_0", "Q4_0")}


def test_f32_gguf_matches_hf(gguf_paths, hf_model, hf_outputs):
    # llama.cpp's layout: stacked experts, Mixtral's Q/K rows permuted, the router as
    # ffn_gate_inp; float weights run on the torch executor.
    llm = _preempting_llm(gguf_paths["F32"])
    _check_greedy(llm, hf_model, hf_outputs)


def _perplexity(llm: LLM, ids: list[int]) -> float:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    logprobs = [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


def _hf_perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(-float(lp.mean()))


def _run(llm: LLM) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantized_gguf_native_and_torch_agree_and_keep_perplexity(
        quant, gguf_paths, hf_model, monkeypatch):
    path = gguf_paths[quant]
    native = LLM(model=path, max_model_len=256, max_num_batched_tokens=24)
    core = native.llm_engine.core
    # The torch-free executor, its experts kept quantized (no float copy of them).
    assert type(core.model).__name__ == "CpuModel"
    moes = [layer.moe for layer in core.model.layers]
    assert all(m is not None and m.gate_up.dtype.name == "uint8" for m in moes)
    ids = native.get_tokenizer().encode(TEXT, add_special_tokens=False)
    assert len(ids) > 40
    reference = _hf_perplexity(hf_model, ids)
    ppl = _perplexity(native, ids)
    assert abs(ppl / reference - 1) < 0.01, (ppl, reference)
    native_out = _run(native)

    monkeypatch.setenv("FASTLLM_TORCH_FREE", "0")
    torch_llm = LLM(model=path, max_model_len=256, max_num_batched_tokens=24)
    executor = torch_llm.llm_engine.core.executor
    assert executor.cpu_decoder is not None  # the native layer loop over the torch model
    decoded = _run(torch_llm)
    executor.cpu_decoder = None  # the per-op Python model (QuantSparseMoe's kernels)
    python = _run(torch_llm)
    for a, b, c in zip(native_out, decoded, python):
        ca, cb, cc = a.outputs[0], b.outputs[0], c.outputs[0]
        assert list(ca.token_ids) == list(cb.token_ids) == list(cc.token_ids)
        for la, lb, lc in zip(ca.logprobs, cb.logprobs, cc.logprobs):
            assert la.keys() == lb.keys() == lc.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5)
                assert la[t].logprob == pytest.approx(lc[t].logprob, abs=1e-5)


def test_bad_moe_configs_raise_value_error():
    base = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100}
    for extra in ({"num_local_experts": 4, "num_experts_per_tok": 5},
                  {"num_experts_per_tok": 2}):
        config = ModelConfig.from_dict({**base, **extra})
        cls = get_model_class(config)
        with pytest.raises(ValueError, match="num_experts_per_tok"), torch.device("meta"):
            cls(config)


def test_benchmark_gguf_generator_writes_a_model_fastllm_serves(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from fastllm.loader import load_config, resolve_model

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "make_moe_gguf.py"
    out = tmp_path / "moe.gguf"
    subprocess.run([sys.executable, str(script), str(out), "--hidden", "128", "--layers", "1",
                    "--experts", "4", "--intermediate", "64"], check=True, capture_output=True,
                   timeout=300, cwd=script.parent)
    config = load_config(resolve_model(str(out), "auto"))
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    llm = LLM(model=str(out), max_model_len=128)
    assert type(llm.llm_engine.core.model).__name__ == "CpuModel"
    result = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)
    assert len(result[0].outputs[0].token_ids) == 4
