"""The one output processor behind LLMEngine and AsyncLLM: n / best_of as one engine request
whose children are grouped by seq_index, best_of ranked by cumulative logprob, and the same
results offline and through AsyncLLM."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from fastllm import LLM, SamplingParams
from fastllm.engine.output_processor import OutputProcessor


def native(rid, seq, tokens, logprobs=(), finished=False, reason="", request_finished=False,
           error=""):
    """A stand-in for _C.RequestOutput with the fields the processor reads (the new tokens as a
    list and the other arrays as numpy, like the binding's)."""
    ids = np.zeros(0, dtype=np.int32)
    values = np.zeros(0, dtype=np.float32)
    return SimpleNamespace(
        request_id=rid, seq_index=seq, new_token_ids=list(tokens),
        new_logprobs=np.array(logprobs, dtype=np.float32),
        num_top_logprobs=0, top_token_ids=ids, top_logprobs=values, prompt_logprobs=values,
        num_prompt_top_logprobs=0, prompt_top_token_ids=ids, prompt_top_logprobs=values,
        finished=finished, finish_reason=reason, stop_token_id=-1, error=error,
        num_cached_tokens=0, request_finished=request_finished,
        cumulative_logprob=float(sum(logprobs)))


def test_children_are_grouped_by_seq_index_and_best_of_is_ranked():
    aborted: list[str] = []
    proc = OutputProcessor(tokenizer=None, abort=aborted.append)
    params = SamplingParams(n=2, best_of=3, max_tokens=2, detokenize=False)
    group = proc.add_request("r", None, [1, 2, 3], params, streaming=True)
    # The prefill step emits every child's first token in seq_index order.
    updates = proc.process([native("r", 0, [5], [-1.0]), native("r", 1, [6], [-0.1]),
                            native("r", 2, [7], [-3.0])])
    assert [(g.request_id, chunks) for g, chunks in updates] == [("r", [])]  # ranked: held
    updates = proc.process([native("r", 1, [8], [-0.2], True, "length"),
                            native("r", 0, [9], [-0.5], True, "length"),
                            native("r", 2, [4], [-0.1], True, "length", request_finished=True)])
    assert group.finished and "r" not in proc and aborted == []
    chunks = updates[0][1]
    # Candidates 1 (-0.3) and 0 (-1.5) are kept, best first; 2 (-3.1) is dropped.
    assert [(c.index, c.token_ids) for c in chunks] == [(0, [6, 8]), (1, [5, 9])]
    assert [c.cumulative_logprob for c in chunks] == pytest.approx([-0.3, -1.5])
    assert all(c.logprobs is None for c in chunks)  # the user did not ask for them
    out = group.to_output()
    assert [(c.index, c.token_ids) for c in out.outputs] == [(0, [6, 8]), (1, [5, 9])]


def test_a_failed_child_fails_the_request_and_aborts_the_rest():
    aborted: list[str] = []
    proc = OutputProcessor(tokenizer=None, abort=aborted.append)
    group = proc.add_request("r", None, [1, 2], SamplingParams(n=2, detokenize=False),
                             streaming=True)
    proc.process([native("r", 0, [5]), native("r", 1, [6])])
    proc.process([native("r", 1, [], finished=True, reason="error", error="boom")])
    assert group.failed and group.error == "boom" and aborted == ["r"]
    assert "r" not in proc
    # The abort's outputs for the other child are ignored.
    assert proc.process([native("r", 0, [], finished=True, reason="abort",
                                request_finished=True)]) == []


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512, quantized_weights="dequantize")


def test_offline_and_async_give_the_same_results(llm):
    """Both faces run the same processor: seeded n = 3 with stop strings and logprobs gives the
    same texts, tokens, logprobs and finish reasons offline and through AsyncLLM."""
    from fastllm.engine.async_llm import AsyncLLM

    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=24, stop=["."],
                            logprobs=2, prompt_logprobs=1)
    offline = llm.generate("The weather today is", params, use_tqdm=False)[0]
    ids = offline.prompt_token_ids

    async def run():
        engine = AsyncLLM(llm.engine_args)
        try:
            texts: dict[int, str] = {}
            tokens: dict[int, list[int]] = {}
            logprobs: dict[int, list] = {}
            reasons: dict[int, str] = {}
            prompt_logprobs: list = []
            async for chunk in engine.generate(ids, params, "a-0"):
                texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
                tokens.setdefault(chunk.index, []).extend(chunk.token_ids)
                logprobs.setdefault(chunk.index, []).extend(chunk.logprobs or [])
                if chunk.prompt_logprobs:
                    assert chunk.index == 0  # computed once, with child 0
                    prompt_logprobs += chunk.prompt_logprobs
                if chunk.finished:
                    reasons[chunk.index] = chunk.finish_reason
            return texts, tokens, logprobs, reasons, prompt_logprobs, engine.stats()
        finally:
            engine.shutdown()

    texts, tokens, logprobs, reasons, prompt_logprobs, stats = asyncio.run(run())
    assert sorted(texts) == [0, 1, 2]
    assert stats.num_prompt_tokens_computed == len(ids)  # one prefill for three children
    for c in offline.outputs:
        assert texts[c.index] == c.text
        assert tokens[c.index] == c.token_ids
        assert reasons[c.index] == c.finish_reason
        assert [{t: lp.logprob for t, lp in e.items()} for e in logprobs[c.index]] == \
            [{t: lp.logprob for t, lp in e.items()} for e in c.logprobs]
    assert len({tuple(c.token_ids) for c in offline.outputs}) == 3
    assert [None if e is None else sorted(e) for e in prompt_logprobs[1:]] == \
        [None if e is None else sorted(e) for e in offline.prompt_logprobs[1:]]
