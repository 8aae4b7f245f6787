"""AsyncLLM's public API, the one object the server talks to: model facts, tokenizer calls,
stats, health and lifecycle, and the collaborators it is given in its constructor."""

from __future__ import annotations

import asyncio

from fastllm import SamplingParams
from fastllm.config import EngineArgs
from fastllm.engine.async_llm import AsyncLLM, served_model_names


class RecordingMetrics:
    """A metrics observer that records what AsyncLLM reports to it."""

    def __init__(self):
        self.prompts: list[int] = []
        self.tokens = 0
        self.finished: list[tuple[str, int]] = []

    def on_prompt(self, num_tokens):
        self.prompts.append(num_tokens)

    def on_tokens(self, stream, now, count):
        self.tokens += count

    def on_request_finished(self, reason, stream, num_tokens):
        self.finished.append((reason, num_tokens))


def test_served_model_names():
    assert served_model_names(EngineArgs()) == ["SmolLM2-135M-Instruct"]
    assert served_model_names(EngineArgs(served_model_name=["a", "b"])) == ["a", "b"]


def test_public_api_of_the_engine_the_server_uses():
    metrics = RecordingMetrics()
    engine = AsyncLLM(EngineArgs(max_model_len=256, max_logprobs=7), metrics=metrics)
    info = engine.model_info
    assert info.source_name == "SmolLM2-135M-Instruct"
    assert info.served_model_names == ("SmolLM2-135M-Instruct",)
    assert info.max_model_len == 256 and info.max_logprobs == 7
    assert info.vocab_size == 49152 and info.block_size > 0 and info.startup_seconds > 0
    assert 2 in info.eos_token_ids  # <|im_end|>
    assert "<|im_start|>" in info.chat_template
    assert engine.metrics is metrics
    assert not engine.is_healthy  # the native loop starts with start()
    assert engine.stats().num_running == 0 and engine.stats().num_total_blocks > 0

    async def run():
        engine.start()
        try:
            assert engine.is_healthy
            ids = await engine.encode("Hello there", add_special_tokens=False)
            assert engine.decode(ids) == "Hello there"
            prompt = engine.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                add_generation_prompt=True)
            assert prompt.endswith("<|im_start|>assistant\n")
            params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            chunks = [c async for c in engine.generate(ids, params, "r-1")]
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finished
            assert engine.num_unfinished_requests == 0
            assert engine.stats().num_generated_tokens >= 3
            return ids
        finally:
            engine.shutdown()

    ids = asyncio.run(run())
    assert not engine.is_healthy
    # The collaborator given to the constructor saw the request.
    assert metrics.prompts == [len(ids)] and metrics.tokens == 3
    assert metrics.finished == [("length", 3)]
    # The engine's parts are private: the server has only the methods above.
    assert not hasattr(engine, "core") and not hasattr(engine, "engine")
    assert not hasattr(engine, "tokenizer")
