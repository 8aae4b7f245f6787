"""Beam search against a straightforward reference over HF transformers' logprobs."""

from __future__ import annotations

import pytest
import torch

from fastllm import LLM, BeamSearchParams


def reference_beam_search(model, prompt: list[int], width: int, max_tokens: int,
                          eos: set[int], length_penalty: float = 1.0):
    """Keep the `width` best unfinished beams by cumulative logprob each step; beams ending in
    EOS are set aside; at the end rank everything by cum / len ** length_penalty."""
    live = [([], 0.0)]
    done = []
    for _ in range(max_tokens):
        cands = []
        for tokens, cum in live:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            values, ids = lp.topk(2 * width)
            cands += [(tokens + [int(i)], cum + float(v)) for v, i in zip(values, ids)]
        cands.sort(key=lambda c: c[1], reverse=True)
        live = []
        for tokens, cum in cands:
            if tokens[-1] in eos:
                done.append((tokens, cum))
            else:
                live.append((tokens, cum))
            if len(live) == width:
                break
    pool = done + live
    pool.sort(key=lambda c: c[1] / (len(c[0]) ** length_penalty), reverse=True)
    return pool[:width]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512, quantized_weights="dequantize")


@pytest.mark.parametrize("width", [2, 3])
def test_beam_search_matches_reference_without_eos(llm, hf_reference_model, width):
    tok = hf_reference_model.tokenizer
    prompt = tok("The best way to learn a language is", add_special_tokens=False)["input_ids"]
    params = BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True)
    out = llm.beam_search([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    ref = reference_beam_search(hf_reference_model.model, prompt, width, 6, set())
    assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
    for seq, (_, cum) in zip(out.sequences, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-3)
    # Beam search finds a sequence at least as likely as greedy decoding's.
    greedy = reference_beam_search(hf_reference_model.model, prompt, 1, 6, set())[0]
    assert out.sequences[0].cum_logprob >= greedy[1] - 1e-4


def test_beam_search_with_eos_and_length_penalty(llm, hf_reference_model):
    tok = hf_reference_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    eos = set(llm.llm_engine.core.engine_config.eos_token_ids)
    params = BeamSearchParams(beam_width=2, max_tokens=10, length_penalty=0.5,
                              early_stopping="never")
    out = llm.beam_search([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    ref = reference_beam_search(hf_reference_model.model, prompt, 2, 10, eos, 0.5)
    assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
    scores = [s.score for s in out.sequences]
    assert scores == sorted(scores, reverse=True)


def test_beam_search_rejects_bad_params(llm):
    with pytest.raises(ValueError, match="beam width"):
        llm.beam_search(["x"], BeamSearchParams(beam_width=0, max_tokens=3), use_tqdm=False)
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.beam_search(["x"], BeamSearchParams(beam_width=11, max_tokens=3), use_tqdm=False)
