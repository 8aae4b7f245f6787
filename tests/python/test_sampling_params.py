"""Every sampling parameter changes the output as specified (offline API, default model)."""

from __future__ import annotations

import collections

import pytest

from fastllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


def gen(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def test_top_k_one_and_min_p_one_are_greedy(llm):
    greedy = gen(llm, "The meaning of life is", temperature=0.0, max_tokens=12, ignore_eos=True)
    for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        sampled = gen(llm, "The meaning of life is", temperature=1.5, max_tokens=12, seed=9,
                      ignore_eos=True, **kw)
        assert sampled.token_ids == greedy.token_ids, kw


def test_temperature_sampling_varies_and_seed_fixes_it(llm):
    outs = {tuple(gen(llm, "Once upon a time", temperature=1.2, max_tokens=10, seed=s,
                      ignore_eos=True).token_ids) for s in range(4)}
    assert len(outs) > 1
    a = gen(llm, "Once upon a time", temperature=1.2, max_tokens=10, seed=5, ignore_eos=True)
    b = gen(llm, "Once upon a time", temperature=1.2, max_tokens=10, seed=5, ignore_eos=True)
    assert a.token_ids == b.token_ids


def repeats(tokens: list[int]) -> int:
    return sum(c - 1 for c in collections.Counter(tokens).values())


def test_penalties_reduce_repetition(llm):
    prompt = "1 1 1 1 1 1"
    plain = gen(llm, prompt, temperature=0.0, max_tokens=24, ignore_eos=True)
    # The greedy " 1" leads its runner-up by 1.4 logits at the third token and by 1.6 at the fifth
    # (by 2.0 after twelve 1s, where the maximum presence penalty, 2.0, sat on the edge: 1.5
    # used to "pass" only because penalised requests failed with no tokens).
    for kw in ({"repetition_penalty": 1.8}, {"frequency_penalty": 1.5},
               {"presence_penalty": 2.0}):
        penalised = gen(llm, prompt, temperature=0.0, max_tokens=24, ignore_eos=True, **kw)
        assert penalised.finish_reason == "length" and len(penalised.token_ids) == 24, kw
        assert penalised.token_ids != plain.token_ids, kw
        assert repeats(penalised.token_ids) < repeats(plain.token_ids), kw


def test_min_tokens_and_max_tokens(llm):
    chat = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    short = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0]
    n = len(short.outputs[0].token_ids)
    assert short.outputs[0].finish_reason == "stop" and n < 20
    longer = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=40, min_tokens=n + 10),
                      use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= n + 10
    assert len(gen(llm, "Hello", max_tokens=3, ignore_eos=True).token_ids) == 3


def test_skip_special_tokens(llm):
    tok = llm.get_tokenizer()
    end = tok.convert_tokens_to_ids(["<|im_end|>"])[0]
    chat = [{"role": "user", "content": "Say hi."}]
    kw = {"temperature": 0.0, "max_tokens": 30, "logit_bias": {end: 100.0}, "ignore_eos": True}
    hidden = llm.chat(chat, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    shown = llm.chat(chat, SamplingParams(skip_special_tokens=False, **kw),
                     use_tqdm=False)[0].outputs[0]
    assert hidden.token_ids == shown.token_ids and end in shown.token_ids
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in hidden.text


def test_truncate_prompt_tokens(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("alpha beta gamma delta epsilon zeta eta theta", add_special_tokens=False)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(
        max_tokens=2, truncate_prompt_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-3:]


def test_continue_final_message_and_bad_template(llm):
    conv = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "My favourite colour is"}]
    out = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=5),
                   add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert text.rstrip().endswith("My favourite colour is")
    with pytest.raises(ValueError):
        llm.chat(conv[:1], chat_template="{{ ''.__class__.__mro__ }}", use_tqdm=False)


# ---- one table of defaults ----------------------------------------------------------------------

def _native_fields(p) -> dict:
    return {name: getattr(p, name) for name in dir(p)
            if not name.startswith("_") and not callable(getattr(p, name))}


def test_python_defaults_equal_the_engine_defaults():
    """SamplingParams is the one table of defaults; the C++ struct keeps its own (C++ users embed
    the engine), so every token-level default is compared here and the two cannot drift."""
    from fastllm import _C

    engine = _native_fields(_C.SamplingParams())
    assert {"n", "max_tokens", "temperature", "top_p", "seed", "logprobs"} <= set(engine)
    assert _native_fields(SamplingParams().to_native()) == engine


def test_request_defaults_come_from_sampling_params():
    """A request body that gives no sampling field yields SamplingParams' defaults; a given
    field is passed on as given (no clamping: validate is the one check)."""
    from fastllm.entrypoints.openai.protocol import CompletionRequest

    empty = CompletionRequest(prompt="x").to_sampling_params(16, None)
    assert empty == SamplingParams()
    given = CompletionRequest(prompt="x", temperature=0.0, presence_penalty=-3.0, n=0,
                              stop_token_ids=[7]).to_sampling_params(16, None)
    assert (given.temperature, given.presence_penalty, given.n, given.stop_token_ids) == \
        (0.0, -3.0, 0, [7])
