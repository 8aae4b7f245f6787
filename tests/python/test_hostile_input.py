"""Hostile and malformed input against the real server: every bad request is a 4xx with an OpenAI
error body, the keep-alive connection survives it, and the server keeps serving."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from test_server import API_KEY, MODEL, start_server, stop_server

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    proc, base = start_server(["--api-key", API_KEY, "--max-model-len", "512",
                               "--disable-log-stats", "--disable-log-requests"])
    yield base
    stop_server(proc)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == response.status_code
    assert isinstance(error["type"], str)
    return error


@pytest.mark.parametrize("field", ["chat_template", "content", "stop", "model", "user"])
def test_lone_surrogates_are_a_400(server, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = "\u0000\ud800"
    if field == "content":
        body["messages"][0]["content"] = bad
    else:
        body[field] = bad
    # json.dumps escapes the surrogate as \ud800, as a client's JSON encoder would.
    raw = json.dumps(body)
    with httpx.Client(base_url=server, headers=HEADERS, timeout=30) as c:
        error = assert_openai_error(c.post("/v1/chat/completions", content=raw), 400)
        assert "Unicode" in error["message"]
        r = c.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": bad}))
        assert_openai_error(r, 400)
        r = c.post("/tokenize", content=json.dumps({"prompt": "a\udfffb"}))
        assert_openai_error(r, 400)


def _malformed_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    """A mix of broken JSON, wrong types, out-of-range values and hostile strings."""
    good = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    good_text = json.dumps(good)
    cases: list[tuple[str, bytes]] = []
    templates = [
        good_text + " trailing garbage",
        good_text + "}",
        good_text[:-1],
        good_text[: len(good_text) // 2],
        "",
        "null",
        "[]",
        '"a string"',
        "{\"messages\": \"not a list\"}",
        '{"messages": [{"role": "user"}], "max_tokens": -5}',
        '{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
        '{"messages": [{"role": "user", "content": "x"}], "n": 0}',
        '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999}',
        '{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 99}',
        '{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}',
        '{"messages": [{"role": "user", "content": "x"}], "stop": [""]}',
        '{"messages": [{"role": "user", "content": "x"}], "chat_template": "{% for %}"}',
        '{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "x"}}',
        '{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}',
        '{"messages": [{"role": "user", "content": "x"}], "model": "no-such-model"}',
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"messages": [], "max_tokens": 1}',
        "\xff\xfe not utf-8",
        '{"prompt": [99999999], "max_tokens": 1}',
        '{"prompt": "x", "max_tokens": 1, "echo": true, "logprobs": 50}',
        '{"prompt": "", "max_tokens": 1}',
        '{"prompt": [[]], "max_tokens": 1}',
        '{"prompt": "x", "best_of": 1, "n": 3}',
        '{"prompt": "x", "guided_json": "{not json"}',
        '{"prompt": "x", "guided_regex": "(unclosed"}',
    ]
    for text in templates:
        path = "/v1/completions" if '"prompt"' in text else "/v1/chat/completions"
        cases.append((path, text.encode("utf-8", "surrogatepass")))
    # Random byte-level damage to a valid body.
    for _ in range(300 - len(cases)):
        data = bytearray(good_text.encode())
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data))
            if op == 0:
                del data[pos]
            elif op == 1:
                data.insert(pos, rng.choice(b'{}[]",:\\x0\xff'))
            else:
                data[pos] = rng.randrange(256)
        cases.append(("/v1/chat/completions", bytes(data)))
    return cases


def test_300_malformed_requests_give_4xx_on_one_connection(server):
    rng = random.Random(1234)
    cases = _malformed_bodies(rng)
    assert len(cases) == 300
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server, headers=HEADERS, timeout=60) as c:
        for path, raw in cases:
            r = c.post(path, content=raw)  # a transport error raises here and fails the test
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                # Byte damage can leave a valid request (e.g. inside the content string).
                assert r.json()["choices"]
                continue
            assert_openai_error(r)
        # The same connection still serves a good request.
        r = c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert not any(code >= 500 for code in statuses), statuses
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) >= 250, statuses


def _raw_exchange(base: str, payload: bytes) -> bytes:
    import socket

    host, port = base.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_body_past_its_content_length_still_gets_its_answer(server):
    """Bytes after the declared body do not parse as a request: the request before them still
    gets its own response first, then a 400 and the connection closes."""
    body = json.dumps({"model": "no-such-model", "messages": [{"role": "user",
                                                                "content": "hi"}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body))
    data = _raw_exchange(server, head + body + b" trailing garbage\r\n\r\n")
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 2, data[:600]
    assert responses[0].startswith(b"404") and b"does not exist" in responses[0]
    assert responses[1].startswith(b"400") and b"connection: close" in responses[1].lower()
