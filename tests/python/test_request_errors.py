"""A failure must never look like success: a fault injected into the executor for one request
reaches that request's client as an error (an exception offline, HTTP 500, an SSE error event then
[DONE]), is counted in /metrics, and leaves the other requests of the same batch untouched."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from fastllm import _C, LLM, SamplingParams
from fastllm.engine.errors import RequestFailedError

POISON = "poisoned"  # a request id containing this makes the injected fault fire


class FaultyExecutor(_C.Executor):
    """Delegates to the real executor, but fails every step whose plan holds a poisoned request
    (a bug that one request's input triggers, as a broken logits processor would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.faults = 0

    def execute(self, plan):
        if any(POISON in rid for rid in plan.request_ids):
            self.faults += 1
            raise RuntimeError("injected executor fault")
        return self.inner.execute(plan)


def with_faulty_executor(core) -> FaultyExecutor:
    """Rebuilds the EngineCore's native engine around a FaultyExecutor (test-only plumbing: the
    front ends reach the native engine through ``core.native`` on every call)."""
    faulty = FaultyExecutor(core.executor)
    core.native = _C.Engine(core.engine_config, faulty)
    return faulty


@pytest.fixture(scope="module")
def llm():
    llm = LLM(max_model_len=256, max_num_seqs=8)
    with_faulty_executor(llm.llm_engine.core)
    return llm


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_penalties_run_on_an_empty_output(llm):
    """numpy >= 2.4 gives empty arrays stride 0; the first step of a penalised request passes an
    empty output-id list to the sampler."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.5)
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6 and out.text


def test_offline_failure_raises_and_the_engine_keeps_working(llm):
    engine = llm.llm_engine
    baseline = llm.generate(["Hello there"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    good = engine.add_request("Hello there", GREEDY, request_id="good-1")
    engine.add_request("Hello there", GREEDY, request_id=f"{POISON}-1")
    with pytest.raises(RequestFailedError, match="injected executor fault"):
        engine.run_until_done([good, f"{POISON}-1"])
    # The healthy request of the same batch is unaffected: it finishes with its own tokens.
    rest = engine.run_until_done([good])
    assert rest[good].outputs[0].token_ids == baseline
    assert not engine.has_unfinished_requests()


# ---- the server --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def faulty_server():
    """An in-process server whose engine runs a FaultyExecutor; a request names itself poisoned
    through the `request_id` extra field."""
    import uvicorn

    from fastllm.entrypoints.openai.api_server import build_app, build_engine
    from fastllm.entrypoints.openai.cli_args import parse_args

    ns = parse_args(["--max-model-len", "256", "--disable-log-stats"], environ={})
    engine = build_engine(ns)
    faulty = with_faulty_executor(engine._core)
    app = build_app(engine, ns)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base, faulty
    server.should_exit = True
    thread.join(timeout=30)


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_server_failure_is_a_500_and_the_batch_is_unaffected(faulty_server):
    base, _ = faulty_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
    errors_before = _metric(base, "fastllm:request_errors_total")

    async def both():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json={**body, "request_id": "ok-1"}),
                c.post("/v1/completions", json={**body, "request_id": f"{POISON}-2"}))

    ok, bad = asyncio.run(both())
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["type"] == "InternalServerError" and "injected executor fault" in error["message"]
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["text"] == alone["choices"][0]["text"]
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert _metric(base, "fastllm:request_errors_total") == errors_before + 1
    # The official client raises for it.
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=2,
                                  extra_body={"request_id": f"{POISON}-3"})


def test_streamed_failure_is_an_error_event_then_done(faulty_server):
    base, _ = faulty_server
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hi"}], "request_id": f"{POISON}-4"}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        raw = r.read().decode()
    events = [block for block in raw.split("\n\n") if block.strip()]
    assert events[-1] == "data: [DONE]"
    error_block = events[-2]
    assert error_block.startswith("event: error\n")
    payload = json.loads(error_block.split("data: ", 1)[1])
    assert payload["error"]["code"] == 500 and "injected" in payload["error"]["message"]
    assert not any('"finish_reason": "error"' in e or '"finish_reason":"error"' in e
                   for e in events)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="injected"):
        for _ in client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                stream=True, max_tokens=4, extra_body={"request_id": f"{POISON}-5"}):
            pass
