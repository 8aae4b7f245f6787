"""The OpenAI-compatible server as users meet it: a real uvicorn process on 127.0.0.1 with the
default model, driven by the official openai client (and raw HTTP where the client cannot go)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict | None = None, timeout: float = 120.0,
                 scheme: str = "http", verify: str | bool = True, health_path: str = "/health"):
    port = free_port()
    cmd = [sys.executable, "-m", "fastllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    base = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}{health_path}", timeout=1, verify=verify).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server():
    # fp32 weights: the tests compare greedy text with the model's known answers.
    proc, base = start_server(["--api-key", API_KEY, "--max-model-len", "1024",
                               "--quantized-weights", "dequantize", "--max-logprobs", "5",
                               "--disable-log-stats"])
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens == 5
    assert out.usage.total_tokens == 13


def test_chat_completion(client):
    out = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0,
                                         max_tokens=30)
    msg = out.choices[0].message
    assert msg.role == "assistant"
    assert "Paris" in msg.content
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens > 0


def test_chat_streaming_equals_non_streaming_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0,
                                          max_tokens=30)
    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0,
                                            max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert text == full.choices[0].message.content
    assert finish == "stop"
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_streaming(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                     temperature=0)
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
        if c.choices]
    assert "".join(parts) == full.choices[0].text
    assert len(parts) >= 6


def test_n_choices_stream_with_their_index(client):
    out = client.chat.completions.create(model=MODEL, messages=CAPITAL, n=3, max_tokens=10,
                                         temperature=1.0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    texts = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=CAPITAL, n=3,
                                                max_tokens=10, temperature=1.0, seed=7,
                                                stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == [0, 1, 2]
    # Seeded: the streamed choices are the non-streamed ones.
    assert [texts[i] for i in range(3)] == [c.message.content for c in
                                            sorted(out.choices, key=lambda c: c.index)]


def test_stop_and_max_tokens(client):
    out = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=30,
                                    temperature=0, stop=[" 6"])
    assert out.choices[0].finish_reason == "stop"
    assert " 6" not in out.choices[0].text and " 5" in out.choices[0].text
    out = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=7,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 7


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0
        assert len(top) >= 3
        assert top[token] == pytest.approx(value)  # greedy: the chosen token is in the top
        assert max(top.values()) == pytest.approx(value)
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_echo(client):
    out = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=3,
                                    temperature=0, echo=True)
    assert out.choices[0].text.startswith("Hello world")
    assert len(out.choices[0].text) > len("Hello world")


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{server}/health").status_code == 200  # not under /v1


def test_bad_requests_get_openai_errors_and_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="not supported yet: suffix"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, suffix="end")
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": "many"},
                   headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.get(f"{server}/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    out = client.completions.create(model=MODEL, prompt="Still alive?", max_tokens=3)
    assert out.usage.completion_tokens >= 1


def test_tokenize_detokenize_health_version(server):
    r = httpx.post(f"{server}/tokenize", json={"prompt": "Hello world"})
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 1024
    back = httpx.post(f"{server}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    chat = httpx.post(f"{server}/tokenize", json={"messages": CAPITAL}).json()
    assert chat["count"] > body["count"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.get(f"{server}/version").json()["version"]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name} missing"
    return float(m.group(1))


def test_metrics_and_disconnect_frees_blocks(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="warm up", max_tokens=2)
    text = httpx.get(f"{server}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"fastllm:num_requests_running", "fastllm:kv_cache_usage_perc",
            "fastllm:prefix_cache_hit_rate", "fastllm:time_to_first_token_seconds",
            "fastllm:inter_token_latency_seconds", "fastllm:e2e_request_latency_seconds",
            "fastllm:generation_tokens", "fastllm:prompt_tokens"} <= set(families)
    ttft = families["fastllm:time_to_first_token_seconds"]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in ttft.samples)
    assert metric(text, "fastllm:generation_tokens_total") > 0
    assert "fastllm:time_to_first_token_seconds_bucket" in text
    assert "fastllm:e2e_request_latency_seconds_count" in text
    # A client that goes away mid-stream: its request is aborted and its KV blocks come back.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 900,
            "stream": True, "extra": None, "ignore_eos": True}
    body.pop("extra")
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers,
                      timeout=30) as r:
        lines = r.iter_lines()  # kept open: the client is still there while we look
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(data) >= 3
        running = metric(httpx.get(f"{server}/metrics").text, "fastllm:num_requests_running")
        assert running == 1
        r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{server}/metrics").text
        if (metric(text, "fastllm:num_requests_running") == 0
                and metric(text, "fastllm:kv_cache_usage_perc") == 0):
            break
        time.sleep(0.2)
    assert metric(text, "fastllm:num_requests_running") == 0
    assert metric(text, "fastllm:kv_cache_usage_perc") == 0
    assert 'finished_reason="abort"' in text


def test_playground_page_is_served(server):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200
    assert "fastllm playground" in r.text and "v1/chat/completions" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN


def test_cors_served_names_and_response_role():
    proc, base = start_server(["--served-model-name", "alpha", "beta", "--response-role",
                               "helper", "--allowed-origins", '["http://example.test"]',
                               "--max-model-len", "512", "--disable-log-stats"])
    try:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["alpha", "beta"]
        out = c.chat.completions.create(model="beta", messages=CAPITAL, max_tokens=3)
        assert out.model == "beta" and out.choices[0].message.role == "helper"
        pre = httpx.options(f"{base}/v1/models", headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "GET"})
        assert pre.headers["access-control-allow-origin"] == "http://example.test"
        other = httpx.options(f"{base}/v1/models", headers={
            "Origin": "http://evil.test", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        log = stop_server(proc)
    assert "serving SmolLM2-135M-Instruct at http://127.0.0.1" in log


def test_unsupported_flag_exits_with_its_name():
    r = subprocess.run([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                        "--cpu-offload-gb", "2"], check=False, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert "--cpu-offload-gb" in r.stderr and "not supported" in r.stderr


def test_kv_cache_dtype_flag():
    from fastllm.entrypoints.openai.api_server import engine_args_from
    from fastllm.entrypoints.openai.cli_args import parse_args

    assert engine_args_from(parse_args([], environ={})).kv_cache_dtype == "auto"
    ns = parse_args(["--kv-cache-dtype", "float32"], environ={})
    assert engine_args_from(ns).kv_cache_dtype == "float32"
    for fp8 in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        ns = parse_args(["--kv-cache-dtype", fp8], environ={})
        assert engine_args_from(ns).kv_cache_dtype == fp8
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "int4"], environ={})


def test_prefix_caching_hash_algo_flag():
    from fastllm.config import EngineArgs
    from fastllm.entrypoints.openai.api_server import engine_args_from
    from fastllm.entrypoints.openai.cli_args import parse_args

    assert engine_args_from(parse_args([], environ={})).prefix_caching_hash_algo == "sha256"
    ns = parse_args(["--prefix-caching-hash-algo", "fast"], environ={})
    assert engine_args_from(ns).prefix_caching_hash_algo == "fast"
    with pytest.raises(SystemExit):
        parse_args(["--prefix-caching-hash-algo", "md5"], environ={})
    with pytest.raises(ValueError, match="'sha256' or 'fast'"):
        EngineArgs(prefix_caching_hash_algo="test_weak").validate()


def test_cli_config_env_precedence(tmp_path):
    from fastllm.entrypoints.openai.cli_args import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-num-seqs: 7\nblock_size: 32\nport: 9001\n")
    env = {"FASTLLM_MAX_NUM_SEQS": "5", "FASTLLM_BLOCK_SIZE": "8", "FASTLLM_SEED": "42",
           "FASTLLM_API_KEY": "from-env"}
    ns = parse_args(["--config", str(cfg), "--block-size", "16"], environ=env)
    assert ns.block_size == 16  # CLI beats config and env
    assert ns.max_num_seqs == 7  # config beats env
    assert ns.seed == 42  # env beats the default
    assert ns.port == 9001 and ns.api_key == "from-env"
    assert parse_args([], environ={}).max_num_seqs == 256
    assert parse_args(["/models/x"], environ={}).model == "/models/x"
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg), "--tensor-parallel-size", "0"], environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("no-such-flag: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)], environ={})


def test_sse_wire_format(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=headers, json={
            "model": MODEL, "messages": CAPITAL, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"


def test_logit_bias_allowed_ids_and_token_id_strings(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                    logit_bias={"4321": 100}, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": True,
                                                "ignore_eos": True})
    assert out.choices[0].logprobs.tokens == ["token_id:4321"] * 4
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0,
                                    seed=3, logprobs=0,
                                    extra_body={"allowed_token_ids": [28, 29],
                                                "return_tokens_as_token_ids": True,
                                                "ignore_eos": True})
    assert set(out.choices[0].logprobs.tokens) <= {"token_id:28", "token_id:29"}
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                  logit_bias={"not-a-token": 1})
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                  logit_bias={"99999999": 1})


def test_echo_with_logprobs_and_prompt_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=2, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.tokens[:5] == ["The", " capital", " of", " France", " is"]
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == 7 and "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2,
                                          extra_body={"prompt_logprobs": 1})
    entries = chat.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == chat.usage.prompt_tokens
    assert all(len(e) >= 1 for e in entries[1:])


def test_beam_search(client):
    out = client.completions.create(model=MODEL, prompt="The best way to learn is", n=2,
                                    max_tokens=5, extra_body={"use_beam_search": True,
                                                              "ignore_eos": True})
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]
    assert out.usage.completion_tokens == 10
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, n=1, max_tokens=12,
                                          extra_body={"use_beam_search": True, "best_of": 2})
    assert "Paris" in chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="cannot be streamed"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                  extra_body={"use_beam_search": True})


def test_ssl_root_path_middleware_chat_template_and_stats_log(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    here = os.path.dirname(os.path.abspath(__file__))
    proc, base = start_server(
        ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/api",
         "--middleware", "server_middleware.add_header", "--chat-template", str(template),
         "--max-model-len", "512"],
        env={"PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""),
             "FASTLLM_LOG_STATS_INTERVAL": "0.5"},
        scheme="https", verify=str(cert))
    try:
        r = httpx.get(f"{base}/v1/models", verify=str(cert))
        assert r.status_code == 200 and r.headers["x-fastllm-middleware"] == "on"
        assert r.json()["data"][0]["id"] == MODEL
        tok = httpx.post(f"{base}/tokenize", verify=str(cert), json={
            "messages": [{"role": "user", "content": "hi"}]}).json()
        text = httpx.post(f"{base}/detokenize", verify=str(cert),
                          json={"tokens": tok["tokens"]}).json()["prompt"]
        assert text == "user: hi\nassistant:"  # the --chat-template file, not the model's
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0,
                          http_client=httpx.Client(verify=str(cert)))
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.total_tokens
        docs = httpx.get(f"{base}/openapi.json", verify=str(cert)).json()
        assert docs["servers"][0]["url"] == "/api"
        time.sleep(1.2)
    finally:
        log = stop_server(proc)
    assert "https://127.0.0.1" in log
    assert re.search(r"running: \d+, waiting: \d+, generation: [0-9.]+ tok/s", log)


def test_streamed_stop_string_never_leaks(client):
    kw = {"model": MODEL, "messages": CAPITAL, "temperature": 0, "max_tokens": 30,
          "stop": [" Paris"]}
    full = client.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    assert full.choices[0].finish_reason == "stop"
    assert streamed == full.choices[0].message.content
    assert "Paris" not in streamed and "Par" not in streamed[-4:]
    kept = client.chat.completions.create(extra_body={"include_stop_str_in_output": True},
                                          **kw)
    assert kept.choices[0].message.content == full.choices[0].message.content + " Paris"


def test_chat_template_kwargs_documents_and_template_errors(server, client):
    template = ("{{ greeting }}|{% for d in documents %}[{{ d['title'] }}]{% endfor %}|"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template,
            "chat_template_kwargs": {"greeting": "Ahoy", "documents": [{"title": "Doc1"}]}}
    ids = httpx.post(f"{server}/tokenize", json=body).json()["tokens"]
    text = httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "Ahoy|[Doc1]|hi"
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"chat_template": template, "documents": [{"title": "D"}],
                    "chat_template_kwargs": {"greeting": "Yo"}})
    assert out.usage.prompt_tokens == len(httpx.post(f"{server}/tokenize", json={
        "messages": [{"role": "user", "content": "hi"}], "chat_template": "Yo|[D]|hi"}).json()[
        "tokens"]) or out.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2,
                                       extra_body={"chat_template": "{{ ''.__class__ }}"})
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2,
                                       extra_body={"chat_template": "{% if %}"})


def test_n_with_a_long_prompt_computes_it_once_over_http(server, client):
    # One engine request per prompt: the n children fork the prompt's blocks after one prefill.
    prompt = [2000 + (i * 7) % 3000 for i in range(300)]
    before = metric(httpx.get(f"{server}/metrics").text, "fastllm:prompt_tokens_computed")
    out = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=3,
                                    temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    after = metric(httpx.get(f"{server}/metrics").text, "fastllm:prompt_tokens_computed")
    assert after - before == 300
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 300 and out.usage.completion_tokens == 12
    # Streamed: every chunk names its child; each child's tokens arrive under its index.
    prompt = [3000 + (i * 11) % 2000 for i in range(200)]
    counts: dict[int, int] = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=3,
                                           temperature=1.0, seed=5, stream=True,
                                           extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            counts[c.index] = counts.get(c.index, 0) + 1
    assert sorted(counts) == [0, 1, 2, 3]
    final = metric(httpx.get(f"{server}/metrics").text, "fastllm:prompt_tokens_computed")
    assert final - after == 200


# The messages LLM.generate raises (tests/python/test_llm.py asserts the same strings).
N_BEST_OF_ERRORS = [({"n": 0}, "n must be a positive integer, got 0"),
                    ({"n": 3, "best_of": 2}, "best_of must be an integer >= n (3), got 2")]


def test_n_best_of_errors_match_offline(client):
    for fields, message in N_BEST_OF_ERRORS:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=fields)
        assert e.value.body["message"] == message
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2,
                                           extra_body=fields)
        assert e.value.body["message"] == message
    with pytest.raises(openai.BadRequestError, match="best_of > n cannot be streamed"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=1, best_of=2,
                                  stream=True)


# Bad sampling parameters: one check (SamplingParams.validate), one message, offline and over HTTP.
BAD_PARAMETERS = [{"temperature": -0.5}, {"top_p": 0.0}, {"n": 0}, {"n": 2, "best_of": 1},
                  {"logprobs": 6}, {"logprobs": -1}, {"stop": [""]}, {"stop": ["ok", ""]}]


def test_bad_parameters_give_the_offline_message_over_http(server):
    from fastllm import LLM, SamplingParams

    llm = LLM(max_model_len=64, max_logprobs=5)  # the server fixture's --max-logprobs
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for fields in BAD_PARAMETERS:
        with pytest.raises(ValueError) as offline:
            llm.generate("hi", SamplingParams(max_tokens=2, **fields), use_tqdm=False)
        message = str(offline.value)
        assert message.split(" ")[0] in ("temperature", "top_p", "n", "best_of", "logprobs",
                                          "stop"), message  # it names the field
        r = httpx.post(f"{server}/v1/completions", headers=headers,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields})
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["message"] == message, fields


@pytest.mark.parametrize("kind", ["text_completion", "chat.completion.chunk"])
def test_stream_events_text_is_the_event_of_its_choice(kind):
    """A text-only chunk is written around the encoded text alone: the same bytes as the general
    event of that choice, for text that needs escaping as well."""
    from fastllm.entrypoints.openai.serving_base import StreamEvents

    events = StreamEvents('cmpl-"q"\\', kind, 1733500000, "mödel/ä")
    for text in ["", " plain", 'quote " back \\ slash', "line\nfeed\ttab\x01\x1f", "é😀用",
                 "\u2028\ud7ff"]:
        choice = ({"index": 3, "delta": {"content": text}} if kind == "chat.completion.chunk"
                  else {"index": 3, "text": text})
        choice.update(logprobs=None, finish_reason=None, stop_reason=None)
        written = events.text(3, text)
        assert written == events.event(choice)
        assert written.startswith("data: ") and written.endswith("\n\n")
        assert json.loads(written[6:]) == {"id": 'cmpl-"q"\\', "object": kind,
                                           "created": 1733500000, "model": "mödel/ä",
                                           "choices": [choice]}


def test_token_metrics_are_folded_in_when_scraped_or_batched():
    """Token counts and inter-token gaps are gathered and go into their series when a scrape
    renders them or when enough gaps have gathered; nothing is lost or counted twice."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from fastllm.entrypoints.openai.metrics import _ITL_BATCH, ServerMetrics

    metrics = ServerMetrics("m")
    stats = SimpleNamespace(num_running=0, num_waiting=0, kv_usage=0.0, prefix_queries=0,
                            prefix_hits=0, num_preemptions=0, num_prompt_tokens_computed=0,
                            spec_draft_tokens=0, spec_accepted_tokens=0, spec_verify_steps=0,
                            spec_draft_seconds=0.0, spec_verify_seconds=0.0)

    def scraped() -> tuple[float, float, float]:
        families = {f.name: f for f in text_string_to_metric_families(
            metrics.render(stats).decode())}
        itl = {s.name: s.value for s in families["fastllm:inter_token_latency_seconds"].samples
               if s.name.endswith(("_count", "_sum"))}
        tokens = families["fastllm:generation_tokens"].samples[0].value
        return tokens, itl["fastllm:inter_token_latency_seconds_count"], \
            itl["fastllm:inter_token_latency_seconds_sum"]

    stream = SimpleNamespace(arrival=0.0, first_token_at=None, last_token_at=None)
    now, gaps = 1.0, 0
    for step in range(_ITL_BATCH + 40):
        count = 2 if step % 7 == 0 else 1
        now += 0.004 * count  # 4 ms a token
        metrics.on_tokens(stream, now, count)
        if stream.first_token_at is None:
            stream.first_token_at = now
        else:
            gaps += 1
        stream.last_token_at = now
        if step == _ITL_BATCH + 5:  # one batch went in on its own, the rest waits
            assert metrics._itl._sum.get() == pytest.approx(0.004 * _ITL_BATCH)
    tokens, itl_count, itl_sum = scraped()
    assert tokens == sum(2 if s % 7 == 0 else 1 for s in range(_ITL_BATCH + 40))
    assert itl_count == gaps == _ITL_BATCH + 39
    assert itl_sum == pytest.approx(0.004 * gaps)
    assert scraped() == (tokens, itl_count, itl_sum)  # a second scrape adds nothing
