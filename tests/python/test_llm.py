"""Model execution end to end: the default GGUF and a tiny random Llama against HF transformers
(fp32, CPU, greedy), through the native engine with chunked prefill, preemption and prefix
caching, and the offline LLM API."""

from __future__ import annotations

import pytest
import torch

from fastllm import LLM, SamplingParams

NEW_TOKENS = 64

PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the tallest mountain on Earth, and how tall is it?\nA:",
    ("Write a short poem about the sea. The waves roll in, the tide goes out, and the gulls "
    "circle over the harbour while the fishermen mend their nets and talk about the weather "
    "that will come with the evening."),
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding with HF's own KV cache, straight through EOS (like ignore_eos)."""
    out: list[int] = []
    past = None
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def hf_token_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log p(output[i] | prompt + output[:i]) from one teacher-forced forward pass."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    rows = lp[n - 1: n - 1 + len(output_ids)]
    return rows.gather(1, torch.tensor(output_ids)[:, None])[:, 0]


@pytest.fixture(scope="module")
def prompt_ids(hf_reference_model) -> list[list[int]]:
    tok = hf_reference_model.tokenizer
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_outputs(hf_reference_model, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_reference_model.model, ids, NEW_TOKENS) for ids in prompt_ids]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


def run_greedy(llm: LLM, prompt_ids: list[list[int]]) -> list:
    return llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY,
                        use_tqdm=False)


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(max_model_len=512, quantized_weights="dequantize")


def test_tokenizer_agrees_with_hf(default_llm, hf_reference_model, prompt_ids):
    tok = default_llm.get_tokenizer()
    assert [tok.encode(p, add_special_tokens=False) for p in PROMPTS] == prompt_ids


def test_default_model_greedy_matches_hf(default_llm, prompt_ids, hf_outputs,
                                         hf_reference_model):
    outs = run_greedy(default_llm, prompt_ids)
    for out, ids, ref in zip(outs, prompt_ids, hf_outputs):
        comp = out.outputs[0]
        assert out.prompt_token_ids == ids
        assert len(comp.token_ids) == NEW_TOKENS
        assert comp.token_ids == ref
        assert comp.finish_reason == "length"
        ours = torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else
                             d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)])
        theirs = hf_token_logprobs(hf_reference_model.model, ids, comp.token_ids)
        assert torch.allclose(ours, theirs, atol=1e-3), (ours - theirs).abs().max()
        assert comp.cumulative_logprob == pytest.approx(float(ours.sum()), abs=1e-3)
        assert comp.text == hf_reference_model.tokenizer.decode(ref, skip_special_tokens=True)


def test_chunked_prefill_matches_hf(prompt_ids, hf_outputs):
    llm = LLM(max_model_len=512, quantized_weights="dequantize", max_num_batched_tokens=16,
              enable_prefix_caching=False)
    outs = run_greedy(llm, prompt_ids)
    assert [o.outputs[0].token_ids for o in outs] == hf_outputs


def test_preemption_keeps_greedy_output(prompt_ids, hf_outputs):
    # 17 usable blocks of 16 tokens: one request of max_model_len fits, the batch does not.
    llm = LLM(max_model_len=256, quantized_weights="dequantize", num_gpu_blocks_override=18,
              block_size=16,
              enable_prefix_caching=False)
    outs = run_greedy(llm, prompt_ids)
    assert [o.outputs[0].token_ids for o in outs] == hf_outputs
    assert llm.llm_engine.stats().num_preemptions > 0


def test_preemption_by_swap_keeps_greedy_output(prompt_ids, hf_outputs):
    llm = LLM(max_model_len=256, quantized_weights="dequantize", num_gpu_blocks_override=18,
              block_size=16,
              preemption_mode="swap",
              swap_space=0.1, enable_prefix_caching=False)
    outs = run_greedy(llm, prompt_ids)
    assert [o.outputs[0].token_ids for o in outs] == hf_outputs
    assert llm.llm_engine.stats().num_preemptions > 0


def test_prefix_cache_hits_keep_greedy_output(default_llm, hf_reference_model):
    tok = hf_reference_model.tokenizer
    shared = ("You are a careful assistant. Answer in one sentence and cite the source of every "
              "fact you state. The question follows after this long shared instruction block.")
    questions = [" Why is the sky blue?", " What is a prime number?"]
    ids = [tok(shared + q, add_special_tokens=False)["input_ids"] for q in questions]
    first = default_llm.generate([{"prompt_token_ids": ids[0]}], GREEDY, use_tqdm=False)[0]
    second = default_llm.generate([{"prompt_token_ids": ids[1]}], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 16
    assert first.outputs[0].token_ids == hf_greedy(hf_reference_model.model, ids[0], NEW_TOKENS)
    assert second.outputs[0].token_ids == hf_greedy(hf_reference_model.model, ids[1],
                                                    NEW_TOKENS)


def test_repeated_prompt_reuses_its_partial_tail_block(default_llm, hf_reference_model):
    # 13 tokens: one full block of 8 on the CPU, and a tail of 5 in the next block. The second
    # request reuses all but the last token (a copy of the tail block) and gives the same text.
    ids = hf_reference_model.tokenizer(
        "The old lighthouse keeper slowly climbed the narrow stairs again at dusk to light the "
        "lamp", add_special_tokens=False)["input_ids"][:13]
    assert len(ids) == 13 and default_llm.llm_engine.core.block_size == 8
    first = default_llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    second = default_llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens == 12
    expected = hf_greedy(hf_reference_model.model, ids, NEW_TOKENS)
    assert first.outputs[0].token_ids == expected
    assert second.outputs[0].token_ids == expected


def test_repeated_prompts_on_block_boundaries_hit_after_other_requests(default_llm,
                                                                       hf_reference_model):
    # Prompts of 16 and 8 tokens (whole CPU blocks) and one of 11, each asked again after the
    # others ran with 24 new tokens: all but the last token of each comes from the cache (a
    # copy of its last block) and the text is the same.
    tok = hf_reference_model.tokenizer
    texts = ["Describe the water cycle and why it matters for farmers who grow rice in dry years",
             "List some practical tips for learning a new language quickly and well",
             "Explain how a refrigerator keeps food cold for a long time"]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:n] for t, n in zip(texts, (16, 8, 11))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    first = [default_llm.generate([{"prompt_token_ids": i}], params, use_tqdm=False)[0]
             for i in ids]
    again = [default_llm.generate([{"prompt_token_ids": i}], params, use_tqdm=False)[0]
             for i in ids]
    assert [o.num_cached_tokens for o in again] == [15, 7, 10]
    for a, b in zip(first, again):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert again[1].outputs[0].token_ids == hf_greedy(hf_reference_model.model, ids[1], 24)


@pytest.mark.parametrize("fixture_name", ["tiny_llama_dir", "tiny_llama_sharded_dir",
                                          "tiny_llama_bin_dir"])
def test_tiny_llama_matches_hf(request, fixture_name):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture_name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=path, max_model_len=256, max_num_batched_tokens=24)
    prompts = [[1, 5, 9, 200, 3000, 47], list(range(100, 160)), [40000, 2, 2, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        comp = out.outputs[0]
        assert comp.token_ids == hf_greedy(hf, p, 32)
        ours = torch.tensor([d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)])
        assert torch.allclose(ours, hf_token_logprobs(hf, p, comp.token_ids), atol=1e-3)


def test_generate_accepts_every_prompt_form(default_llm):
    tok = default_llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    by_text = default_llm.generate("Hello there", params, use_tqdm=False)
    by_ids = default_llm.generate([tok.encode("Hello there")], params, use_tqdm=False)
    by_dict = default_llm.generate([{"prompt": "Hello there"}], params, use_tqdm=False)
    by_kw = default_llm.generate(prompt_token_ids=[tok.encode("Hello there")],
                                 sampling_params=params, use_tqdm=False)
    texts = {o[0].outputs[0].text for o in (by_text, by_ids, by_dict, by_kw)}
    assert len(texts) == 1 and texts.pop()
    assert by_text[0].prompt == "Hello there"
    # One params object per prompt, outputs in prompt order.
    outs = default_llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=n, temperature=0,
                                                                 ignore_eos=True)
                                                  for n in (1, 2, 3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3]


def test_chat_applies_the_template(default_llm, hf_reference_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = default_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=20),
                           use_tqdm=False)[0]
    expected_ids = hf_reference_model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected_ids)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_stop_strings_and_stop_tokens(default_llm):
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = default_llm.generate("Count: 1, 2, 3,", base, use_tqdm=False)[0].outputs[0]
    assert " 5" in full.text
    cut = default_llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, stop=[" 5"]), use_tqdm=False)[0]
    comp = cut.outputs[0]
    assert comp.text == full.text[: full.text.index(" 5")]
    assert comp.finish_reason == "stop" and comp.stop_reason == " 5"
    kept = default_llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, stop=" 5",
        include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(" 5") + 2]
    stop_tok = full.token_ids[3]
    by_token = default_llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_tok]),
        use_tqdm=False)[0].outputs[0]
    assert by_token.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert by_token.stop_reason == stop_tok


def test_seeded_sampling_is_reproducible_in_any_batch(default_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234,
                            ignore_eos=True)
    alone = default_llm.generate("Tell me a story", params, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = default_llm.generate(["Hi", "Tell me a story", "Another prompt here"],
                                 [others, params, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_bad_inputs_raise_value_error(default_llm):
    with pytest.raises(ValueError, match="n must be"):
        default_llm.generate("x", SamplingParams(n=0), use_tqdm=False)
    with pytest.raises(ValueError, match="best_of"):
        default_llm.generate("x", SamplingParams(n=3, best_of=2), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        default_llm.generate("x", SamplingParams(temperature=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        default_llm.generate([{"prompt_token_ids": [5] * 600}], use_tqdm=False)
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(max_model_lenn=5)
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        LLM(prefix_caching_hash_algo="md5")
    with pytest.raises(ValueError):
        LLM(model="/nonexistent/model/dir")
    # The engine still serves after the errors.
    out = default_llm.generate("ok", SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_parallel_sampling_and_best_of(default_llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=11, ignore_eos=True)
    out = default_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # distinct child seeds
    again = default_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    # One engine request: the prompt is computed once and the children fork its blocks (no
    # prefix-cache lookups for the siblings, no recomputed last token).
    engine = default_llm.llm_engine
    before = engine.stats()
    prompt_ids = [1000 + i for i in range(41)]
    four = default_llm.generate([prompt_ids], SamplingParams(n=4, max_tokens=2),
                                use_tqdm=False)[0]
    after = engine.stats()
    assert [len(c.token_ids) for c in four.outputs] == [2, 2, 2, 2]
    assert after.prefix_hits - before.prefix_hits == 0
    assert after.num_prompt_tokens_computed - before.num_prompt_tokens_computed == 41
    best = default_llm.generate("Once upon a time", SamplingParams(
        n=2, best_of=5, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True),
        use_tqdm=False)[0]
    assert len(best.outputs) == 2
    cums = [c.cumulative_logprob for c in best.outputs]
    assert cums == sorted(cums, reverse=True)
    assert all(c.logprobs is None for c in best.outputs)  # not asked for by the user
    five = default_llm.generate("Once upon a time", SamplingParams(
        n=5, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True, logprobs=0),
        use_tqdm=False)[0]
    assert max(c.cumulative_logprob for c in five.outputs) == pytest.approx(cums[0], abs=1e-4)


def test_logit_bias_and_allowed_token_ids(default_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    base = default_llm.generate("The weather today is", greedy, use_tqdm=False)[0].outputs[0]
    first = base.token_ids[0]
    banned = default_llm.generate("The weather today is", SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={first: -100.0}),
        use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[0] != first
    forced = default_llm.generate("The weather today is", SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={4321: 100.0}),
        use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [4321] * 6
    allowed = [11, 12, 13]
    limited = default_llm.generate("The weather today is", SamplingParams(
        temperature=1.0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed, seed=1),
        use_tqdm=False)[0].outputs[0]
    assert set(limited.token_ids) <= set(allowed)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        default_llm.generate("x", SamplingParams(allowed_token_ids=[10**7]), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        default_llm.generate("x", SamplingParams(logit_bias={5: 1000.0}), use_tqdm=False)


def test_prompt_logprobs_match_hf_across_chunks(hf_reference_model, prompt_ids):
    llm = LLM(max_model_len=512, quantized_weights="dequantize", max_num_batched_tokens=8)
    ids = prompt_ids[3]  # the longest prompt: several 8-token chunks
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_reference_model.model(torch.tensor([ids])).logits[0].float(),
                                dim=-1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-3)
        top3 = ref[pos - 1].topk(3).indices.tolist()
        ranked = [t for t, lp in entry.items() if lp.rank is not None]
        assert set(top3) <= set(ranked)


def test_n_with_a_long_prompt_computes_it_once(default_llm):
    engine = default_llm.llm_engine
    prompt_ids = [2000 + (i * 7) % 3000 for i in range(300)]
    before = engine.stats()
    out = default_llm.generate([prompt_ids], SamplingParams(n=4, max_tokens=3, ignore_eos=True,
                                                            temperature=1.0, seed=5),
                               use_tqdm=False)[0]
    after = engine.stats()
    assert after.num_prompt_tokens_computed - before.num_prompt_tokens_computed == 300
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 3 for c in out.outputs)


def test_n_with_stop_strings_and_prompt_logprobs(default_llm):
    # Each child stops on its own stop string; prompt logprobs (computed once, with child 0)
    # come with the request.
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=40, stop=[" ", "."],
                            prompt_logprobs=1)
    out = default_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert " " not in c.text and "." not in c.text
        assert c.finish_reason in ("stop", "length")
    n_prompt = len(out.prompt_token_ids)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == n_prompt
    assert out.prompt_logprobs[0] is None
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, n_prompt))


def test_n_best_of_errors(default_llm):
    # The server answers the same messages (tests/python/test_server.py N_BEST_OF_ERRORS).
    cases = [(SamplingParams(n=0), "n must be a positive integer, got 0"),
             (SamplingParams(n=3, best_of=2), "best_of must be an integer >= n (3), got 2")]
    for params, message in cases:
        with pytest.raises(ValueError) as e:
            default_llm.generate("hi", params, use_tqdm=False)
        assert str(e.value) == message
