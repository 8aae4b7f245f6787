"""Speculative decoding end to end: n-gram lookup and draft models on the default model (the
torch-free quantized path) and on tiny random models (the torch path); greedy and seeded outputs
equal to decoding without speculation, the sampled distribution equal to the target's, typical
acceptance, metrics and configuration errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fastllm import _C, LLM, SamplingParams
from fastllm.config import EngineArgs

# Prompts where lookup pays (text to repeat) and where it mostly does not.
CODE = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
        "fibonacci(n - 2)\n\ndef factorial(n):\n    if n < 2:\n        return 1\n    return n * "
        "factorial(n - 1)\n")
TEXT = ("The river rises in the hills north of the town, runs past the old mill and the market "
        "square, and reaches the sea after forty miles of farmland, woods and marsh.")
PROMPTS = [f"Copy this code exactly:\n{CODE}\nCopy:\n", "Once upon a time, in a small village,",
           "Count from 1 to 30: 1, 2, 3, 4,", f"Repeat word for word: {TEXT}\nRepeated: "]
NGRAM = {"speculative_model": "[ngram]"}


def ngram(k: int, **extra) -> dict:
    """n-gram speculation with k drafts every step: the draft planner (adaptive, on by default)
    decides from measured step times, so tests that count drafts switch it off."""
    return {"speculative_config": {"method": "ngram", "num_speculative_tokens": k,
                                   "adaptive": False, **extra}}


def outputs(llm: LLM, prompts, params: SamplingParams):
    return [r.outputs for r in llm.generate(prompts, params, use_tqdm=False)]


def stats(llm: LLM):
    return llm.llm_engine.core.native.stats()


@pytest.fixture(scope="module")
def plain_llm() -> LLM:
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def greedy_reference(plain_llm):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    return outputs(plain_llm, PROMPTS, params)


def same_outputs(a, b, logprob_tolerance: float = 0.0) -> None:
    """Equal tokens and text; logprobs equal (the native CPU path: bit for bit, a token's logits
    do not depend on the other rows of its step) or within a tolerance (torch's kernels)."""
    for xs, ys in zip(a, b):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert list(x.token_ids) == list(y.token_ids)
            assert x.text == y.text
            if x.logprobs is None:
                continue
            for ex, ey in zip(x.logprobs, y.logprobs, strict=True):
                assert ex.keys() == ey.keys()
                for t in ex:
                    assert abs(ex[t].logprob - ey[t].logprob) <= logprob_tolerance


@pytest.mark.parametrize("k,extra", [
    (1, {}),
    (3, {"max_num_batched_tokens": 16}),  # chunked prefill, drafts cut by the budget
    (5, {"adaptive": True}),  # the planner: equal outputs whatever it decides
    # 33 blocks of 8 tokens for four sequences needing ~48: preemption
    (8, {"num_gpu_blocks_override": 34, "max_model_len": 256}),
    (4, {"num_gpu_blocks_override": 34, "max_model_len": 256, "preemption_mode": "swap"}),
])
def test_ngram_greedy_equals_plain_decoding(greedy_reference, k, extra):
    extra = dict(extra)
    adaptive = extra.pop("adaptive", False)
    kw = {**NGRAM, "num_speculative_tokens": k} if adaptive else ngram(k)
    extra.setdefault("max_model_len", 512)
    llm = LLM(**kw, **extra)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    # Twice: the second round hits the prefix cache.
    for _ in range(2):
        same_outputs(outputs(llm, PROMPTS, params), greedy_reference)
    s = stats(llm)
    if not adaptive:
        assert s.spec_accepted_tokens > 0 and s.spec_verify_steps > 0
    if "num_gpu_blocks_override" in extra:
        assert s.num_preemptions > 0
    assert s.num_free_blocks == s.num_total_blocks


def test_lookup_pays_on_text_to_repeat():
    llm = LLM(max_model_len=512, **ngram(6))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs(llm, PROMPTS[3:], params)  # the model repeats the passage
    s = stats(llm)
    # The copy is mostly accepted: far fewer target steps than tokens.
    assert s.spec_accepted_tokens > 0.6 * s.spec_draft_tokens
    assert (s.spec_accepted_tokens + s.spec_verify_steps) / s.spec_verify_steps > 3.0
    assert s.num_steps < 20


def test_seeded_sampling_is_reproducible_and_equal_to_plain(plain_llm):
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=40, ignore_eos=True)
              for s in (1, 2, 3)]
    plain = [plain_llm.generate(PROMPTS, p, use_tqdm=False) for p in params]
    llm = LLM(max_model_len=512, **ngram(4))
    for _ in range(2):
        spec = [llm.generate(PROMPTS, p, use_tqdm=False) for p in params]
        for a, b in zip(plain, spec):
            assert [list(r.outputs[0].token_ids) for r in a] == \
                [list(r.outputs[0].token_ids) for r in b]
    assert stats(llm).spec_accepted_tokens > 0


def test_parallel_sampling_stop_strings_and_max_tokens(plain_llm):
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=30, stop=["old mill"],
                            logprobs=1)
    llm = LLM(max_model_len=512, **ngram(5))
    same_outputs(outputs(llm, PROMPTS, params), outputs(plain_llm, PROMPTS, params))
    copy = llm.generate(PROMPTS[3:], SamplingParams(temperature=0, max_tokens=200,
                                                    stop=["old mill"]), use_tqdm=False)
    out = copy[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "old mill"
    assert out.text.endswith("past the ")
    # No token past the one that completed the stop string, though drafts ran ahead of it.
    tok = llm.get_tokenizer()
    assert "old mill" in tok.decode(list(out.token_ids))
    assert "old mill" not in tok.decode(list(out.token_ids)[:-1])
    assert stats(llm).spec_accepted_tokens > 0
    short = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=7,
                                                     ignore_eos=True), use_tqdm=False)
    assert len(short[0].outputs[0].token_ids) == 7


def test_guided_requests_run_without_drafts():
    llm = LLM(max_model_len=512, **NGRAM, num_speculative_tokens=4)
    from fastllm.guided import GuidedDecodingParams

    params = SamplingParams(temperature=0, max_tokens=10,
                            guided_decoding=GuidedDecodingParams(choice=["yes yes yes", "no"]))
    out = llm.generate(["Answer yes yes yes or no: yes yes"], params, use_tqdm=False)
    assert out[0].outputs[0].text in ("yes yes yes", "no")
    assert stats(llm).spec_draft_tokens == 0


# ---- draft models ---------------------------------------------------------------------------

def test_default_model_drafting_for_itself_is_always_accepted(greedy_reference,
                                                              default_gguf_path):
    # A pool small enough to preempt, and a second round that hits the prefix cache.
    llm = LLM(max_model_len=256, num_gpu_blocks_override=34, speculative_config={
        "model": default_gguf_path, "num_speculative_tokens": 4, "adaptive": False})
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    for _ in range(2):
        same_outputs(outputs(llm, PROMPTS, params), greedy_reference)
    s = stats(llm)
    assert s.spec_draft_tokens > 0 and s.spec_accepted_tokens == s.spec_draft_tokens
    assert s.num_preemptions > 0 and s.prefix_hits > 0


@pytest.fixture(scope="module")
def other_tiny_llama(tmp_path_factory, default_gguf_path) -> str:
    """A second tiny random Llama (other seed, one layer) with the same tokenizer: a draft model
    that is often wrong."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_fixtures import TINY_LLAMA_CONFIG, write_smollm2_tokenizer_files

    torch.manual_seed(99)
    cfg = LlamaConfig(**{**TINY_LLAMA_CONFIG, "num_hidden_layers": 1})
    path = str(tmp_path_factory.mktemp("draft") / "tiny_draft")
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    write_smollm2_tokenizer_files(path, default_gguf_path)
    return path


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_draft_model_greedy_equals_plain_on_tiny_models(tiny_llama_dir, other_tiny_llama, k):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 100, 200, 300], [1] + list(range(400, 440))]
    prompts = [{"prompt_token_ids": p} for p in prompts]
    plain = outputs(LLM(model=tiny_llama_dir, max_model_len=256), prompts, params)
    for draft, always_right in ((tiny_llama_dir, True), (other_tiny_llama, False)):
        llm = LLM(model=tiny_llama_dir, max_model_len=256, max_num_batched_tokens=32,
                  speculative_config={"model": draft, "num_speculative_tokens": k,
                                      "adaptive": False})
        same_outputs(outputs(llm, prompts, params), plain, logprob_tolerance=1e-4)
        s = stats(llm)
        assert s.spec_draft_tokens > 0
        assert (s.spec_accepted_tokens == s.spec_draft_tokens) == always_right


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value with upper tail p ~ 0.001 (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_rejection_sampling_keeps_the_target_distribution(tiny_llama_dir):
    """Many seeded 3-token samples with a greedy draft (the target itself, so its drafts are
    accepted about as often as the target's argmax is drawn): the triples' frequencies match
    p(t1) p(t2 | t1) p(t3 | t1, t2) of the target (chi-square, p = 0.001)."""
    prompt = [1, 42, 4242, 17, 99]
    llm = LLM(model=tiny_llama_dir, max_model_len=128, max_num_seqs=256,
              speculative_config={"model": tiny_llama_dir, "num_speculative_tokens": 2,
                                  "adaptive": False})
    n = 4000
    params = [SamplingParams(temperature=1.0, top_k=4, seed=s, max_tokens=3, ignore_eos=True)
              for s in range(n)]
    results = llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False)
    triples = Counter(tuple(r.outputs[0].token_ids) for r in results)
    s = stats(llm)
    assert 0 < s.spec_accepted_tokens < s.spec_draft_tokens  # both verdicts happened

    cache: dict[tuple, dict[int, float]] = {}

    def top4(prefix: tuple) -> dict[int, float]:
        if prefix not in cache:
            r = llm.generate([{"prompt_token_ids": prompt + list(prefix)}],
                             SamplingParams(temperature=0, max_tokens=1, logprobs=4),
                             use_tqdm=False)[0].outputs[0].logprobs[0]
            top = sorted(r.items(), key=lambda kv: -kv[1].logprob)[:4]
            z = sum(math.exp(v.logprob) for _, v in top)
            cache[prefix] = {t: math.exp(v.logprob) / z for t, v in top}
        return cache[prefix]

    expected: dict[tuple, float] = {}
    for t1, p1 in top4(()).items():
        for t2, p2 in top4((t1,)).items():
            for t3, p3 in top4((t1, t2)).items():
                expected[(t1, t2, t3)] = n * p1 * p2 * p3
    assert set(triples) <= set(expected)
    chi2, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for key, e in expected.items():
        if e < 5:
            pooled_obs += triples.get(key, 0)
            pooled_exp += e
            continue
        chi2 += (triples.get(key, 0) - e) ** 2 / e
        df += 1
    if pooled_exp > 0:
        chi2 += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert df >= 10
    assert chi2 < _chi_square_critical(df), (chi2, df)


# ---- typical acceptance ---------------------------------------------------------------------

def test_typical_acceptance_kernel_matches_its_definition():
    from fastllm import kernels

    rng = np.random.default_rng(5)
    rows, vocab = 64, 300
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4.0, (rows, 1))).astype(
        np.float32)
    drafts = rng.integers(0, vocab, rows).astype(np.int32)
    drafts[::3] = logits[::3].argmax(axis=1)  # some likely drafts
    drafts[5] = -1  # a bonus row: sampled as usual
    temperature = np.full(rows, 0.7, np.float32)
    threshold, alpha = 0.09, 0.3
    sampled = np.empty(rows, np.int32)
    inputs = kernels.SamplingInputs(temperature=temperature, draft_ids=drafts,
                                    typical_threshold=threshold, typical_alpha=alpha,
                                    global_seed=3)
    _C.ops.sample(logits, inputs, sampled)
    accepted = 0
    for r in range(rows):
        if drafts[r] < 0:
            continue
        x = logits[r].astype(np.float64) / 0.7
        p = np.exp(x - x.max())
        p /= p.sum()
        entropy = -(p * np.log(p)).sum()
        ok = p[drafts[r]] > min(threshold, alpha * math.exp(-entropy))
        accepted += ok
        assert sampled[r] == (drafts[r] if ok else int(np.argmax(logits[r]))), r
    assert 0 < accepted < rows - 1


def test_typical_acceptance_serves_and_keeps_greedy_exact(greedy_reference):
    llm = LLM(max_model_len=512, **ngram(4, acceptance_method="typical_acceptance_sampler"))
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    same_outputs(outputs(llm, PROMPTS, greedy), greedy_reference)
    sampled = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.7, seed=1, max_tokens=64),
                           use_tqdm=False)
    assert sampled[0].outputs[0].text
    assert stats(llm).spec_accepted_tokens > 0


# ---- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"speculative_model": "[ngram]"}, "num_speculative_tokens"),
    ({"speculative_model": "[ngram]", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 3}, "proposer"),
    ({"speculative_config": {"method": "medusa", "num_speculative_tokens": 2}}, "medusa"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "k": 3}},
     "unknown speculative"),
    ({"speculative_model": "[ngram]", "num_speculative_tokens": 2, "ngram_prompt_lookup_min": 5,
      "ngram_prompt_lookup_max": 2}, "must not exceed"),
    ({"speculative_model": "[ngram]", "num_speculative_tokens": 2,
      "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "not both"),
    ({"speculative_model": "/some/draft", "num_speculative_tokens": 2,
      "speculative_draft_tensor_parallel_size": 2}, "tensor-parallel"),
    ({"num_lookahead_slots": 4}, "num_lookahead_slots"),
    ({"speculative_model": "[ngram]", "num_speculative_tokens": 4, "num_lookahead_slots": 2},
     "num_lookahead_slots"),
])
def test_bad_configurations_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs.from_kwargs(**kwargs).validate()


def test_draft_with_another_vocabulary_is_refused(tmp_path, tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_fixtures import TINY_LLAMA_CONFIG

    draft = str(tmp_path / "other_vocab")
    cfg = LlamaConfig(**{**TINY_LLAMA_CONFIG, "vocab_size": 1000, "num_hidden_layers": 1})
    LlamaForCausalLM(cfg).save_pretrained(draft, safe_serialization=True)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens"):
        LLM(model=tiny_llama_dir, max_model_len=128, speculative_model=str(draft),
            num_speculative_tokens=2)


def test_server_flags_metrics_and_startup_errors():
    import httpx

    from test_server import metric, start_server, stop_server

    bad = subprocess.run([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                          "--speculative-model", "[ngram]"], check=False, capture_output=True,
                         text=True, timeout=120, env={**os.environ})
    assert bad.returncode != 0 and "num_speculative_tokens" in bad.stderr + bad.stdout
    proc, base = start_server(["--max-model-len", "512", "--speculative-config",
                               json.dumps(ngram(5)["speculative_config"]),
                               "--disable-log-stats"])
    try:
        r = httpx.post(f"{base}/v1/completions", json={
            "model": "SmolLM2-135M-Instruct", "prompt": PROMPTS[3], "max_tokens": 48,
            "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48
        text = httpx.get(f"{base}/metrics").text
        drafts = metric(text, "fastllm:spec_decode_num_draft_tokens")
        accepted = metric(text, "fastllm:spec_decode_num_accepted_tokens")
        assert 0 < accepted <= drafts
        assert metric(text, "fastllm:spec_decode_draft_acceptance_rate") == \
            pytest.approx(accepted / drafts)
        assert metric(text, "fastllm:spec_decode_mean_accepted_length") > 1.0
        assert metric(text, "fastllm:spec_decode_verify_time_seconds") > 0
    finally:
        out = stop_server(proc)
    assert "speculative decoding: n-gram lookup" in out
