"""Guided decoding: JSON schema, JSON object, regex, choice and grammar constraints, through the
server (the official openai client) and offline; errors; a guided request beside an unguided
one in the same batch."""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest

from fastllm.guided import GuidedDecodingParams
from fastllm.guided.registry import GuidedRegistry
from test_server import MODEL, start_server, stop_server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PHONE = r"\d{3}-\d{3}-\d{4}"
# Lark: a tiny arithmetic language
ARITH = """
start: expr
expr: term | term op term | term op term op term
op: "+" | "-"
term: NUMBER
NUMBER: /[1-9][0-9]?/
"""
ARITH_RE = re.compile(r"[1-9][0-9]?([+-][1-9][0-9]?){0,2}")


@pytest.fixture(scope="module")
def server():
    # fp32 weights: one test compares greedy text across batch compositions, and the quantized
    # GEMM's row tiling changes rounding with the batch size.
    proc, base = start_server(["--max-model-len", "1024", "--quantized-weights", "dequantize",
                               "--disable-log-stats"])
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            delta = getattr(c, "delta", None)
            text += (delta.content or "") if delta is not None else (c.text or "")
            finish = c.finish_reason or finish
    return text, finish


def test_chat_guided_json_validates(client):
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=temperature, seed=3, max_tokens=120,
            extra_body={"guided_json": PERSON})
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_chat_guided_json_as_string_and_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0.8, seed=7, max_tokens=120, stream=True,
        extra_body={"guided_json": json.dumps(PERSON)})
    text, finish = _stream_text(stream)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_response_format_json_schema_and_json_object(client):
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0.7, seed=1, max_tokens=120,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    ask = [{"role": "user", "content": "Give a JSON object with the keys name and age of a "
                                       "person."}]
    out = client.chat.completions.create(model=MODEL, messages=ask, temperature=0,
                                         max_tokens=200, response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_completion_regex_streaming_and_not(client):
    for seed in (0, 1):
        out = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=30,
                                        temperature=1.0, seed=seed,
                                        extra_body={"guided_regex": PHONE})
        assert re.fullmatch(PHONE, out.choices[0].text), out.choices[0].text
        assert out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=30,
                                       temperature=1.0, seed=5, stream=True,
                                       extra_body={"guided_regex": PHONE})
    text, finish = _stream_text(stream)
    assert re.fullmatch(PHONE, text) and finish == "stop"


def test_choice(client):
    choices = ["positive", "negative", "neutral"]
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL, temperature=1.0, seed=seed, max_tokens=10,
            messages=[{"role": "user", "content": "Classify: fastllm is wonderful!"}],
            extra_body={"guided_choice": choices})
        assert out.choices[0].message.content in choices
    out = client.completions.create(model=MODEL, prompt="Sentiment:", max_tokens=10, n=2,
                                    temperature=1.0, seed=4,
                                    extra_body={"guided_choice": choices})
    assert len(out.choices) == 2 and all(c.text in choices for c in out.choices)


def test_lark_grammar(client):
    for seed in range(2):
        out = client.completions.create(model=MODEL, prompt="Some arithmetic: ", max_tokens=20,
                                        temperature=1.0, seed=seed,
                                        extra_body={"guided_grammar": ARITH})
        text = out.choices[0].text
        assert ARITH_RE.fullmatch(text), text
        assert out.choices[0].finish_reason == "stop"


def test_whitespace_pattern(client):
    for pattern in ("", "[ ]?"):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0.8, seed=2, max_tokens=120,
            extra_body={"guided_json": PERSON, "guided_whitespace_pattern": pattern})
        text = out.choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert "\n" not in outside_strings, text
        if pattern == "":
            assert " " not in outside_strings, text


def _error(server, path, body) -> httpx.Response:
    return httpx.post(f"{server}{path}", json={"model": MODEL, **body}, timeout=60)


@pytest.mark.parametrize("extra, needle", [
    ({"guided_json": {"type": "nope"}}, "JSON schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a(b"}, "regex"),
    ({"guided_grammar": "start: undefined_rule"}, "grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "outlines"),
    ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "xgrammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
])
def test_invalid_constraints_are_400(server, extra, needle):
    if extra.get("guided_decoding_backend") == "xgrammar":
        pytest.importorskip("fastllm")  # the check below only holds without xgrammar
        import importlib.util
        if importlib.util.find_spec("xgrammar") is not None:
            pytest.skip("xgrammar is installed")
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 5}),
                       ("/v1/chat/completions", {"messages": ASK, "max_tokens": 5})):
        for stream in (False, True):
            r = _error(server, path, {**body, **extra, "stream": stream})
            assert r.status_code == 400, (path, r.text)
            message = r.json()["error"]["message"]
            assert needle.lower() in message.lower(), message


def test_guided_and_unguided_in_one_batch(client):
    prompt = "The capital of France is"
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                      temperature=0).choices[0].text
    results: dict[str, str] = {}

    def guided():
        out = client.completions.create(model=MODEL, prompt="JSON please:", max_tokens=120,
                                        temperature=0,
                                        extra_body={"guided_json": PERSON,
                                                    "guided_whitespace_pattern": "[ ]?"})
        results["guided"] = out.choices[0].text

    def unguided():
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                        temperature=0)
        results["unguided"] = out.choices[0].text

    threads = [threading.Thread(target=f) for f in (guided, unguided, guided)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    jsonschema.validate(json.loads(results["guided"]), PERSON)
    assert results["unguided"] == alone


# ---- offline --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    from fastllm import LLM

    return LLM(max_model_len=512, quantized_weights="dequantize")


def test_offline_guided_batch(llm):
    from fastllm import SamplingParams

    prompts = ["A person as JSON:", "The capital of France is", "A phone number:",
               "Answer yes or no:"]
    params = [
        SamplingParams(temperature=0, max_tokens=120,
                       guided_decoding=GuidedDecodingParams(json=PERSON)),
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=1.0, seed=2, max_tokens=30,
                       guided_decoding=GuidedDecodingParams(regex=PHONE)),
        SamplingParams(temperature=1.0, seed=2, max_tokens=5, n=3,
                       guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), PERSON)
    alone = llm.generate(prompts[1], params[1], use_tqdm=False)[0].outputs[0].text
    assert outs[1].outputs[0].text == alone
    assert re.fullmatch(PHONE, outs[2].outputs[0].text)
    assert len(outs[3].outputs) == 3 and all(c.text in ("yes", "no") for c in outs[3].outputs)
    # the registry is empty once every request finished
    assert len(llm.llm_engine.guided.registry) == 0


def test_offline_json_object_and_errors(llm):
    from fastllm import SamplingParams

    ask = [{"role": "user", "content": "Give a JSON object with the keys name and age of a "
                                       "person."}]
    out = llm.chat(ask, SamplingParams(temperature=0, max_tokens=200,
                                       guided_decoding=GuidedDecodingParams(json_object=True)),
                   use_tqdm=False)
    assert isinstance(json.loads(out[0].outputs[0].text), dict)
    with pytest.raises(ValueError, match="regex"):
        llm.generate("x", SamplingParams(guided_decoding=GuidedDecodingParams(regex="(")),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(guided_decoding=GuidedDecodingParams(regex="a", choice=["a"])).validate()
    with pytest.raises(ValueError, match="unknown guided decoding backend"):
        SamplingParams(guided_decoding=GuidedDecodingParams(regex="a", backend="nope")
                       ).validate()


def test_compile_cache_hits(llm):
    manager = llm.llm_engine.guided
    a = manager.compile(GuidedDecodingParams(json=PERSON))
    b = manager.compile(GuidedDecodingParams(json=json.dumps(PERSON)))
    assert a is b


class _Plan:
    """The fields of a BatchPlan the registry reads."""

    def __init__(self, ids, positions):
        self.request_ids = ids
        self.num_samples = len(ids)
        self.sample_seq_indices = list(range(len(ids)))
        self.output_positions = positions


def test_registry_masks_only_guided_rows_and_never_re_advances(llm):
    import torch

    manager = llm.llm_engine.guided
    tok = llm.get_tokenizer()
    vocab = llm.llm_engine.core.model_config.vocab_size
    registry = GuidedRegistry(vocab, sorted(tok.eos_token_ids))
    registry.register("g", manager.compile(GuidedDecodingParams(choice=["yes", "no"]))
                      .new_matcher())
    logits = torch.zeros(2, vocab)
    rows = registry.apply(_Plan(["u", "g"], [0, 0]), logits)
    assert torch.isfinite(logits[0]).all()  # the unguided row is untouched
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t]))
                           for t in allowed)
    first = tok.encode("yes", add_special_tokens=False)[0]
    registry.advance(rows, torch.tensor([0, first]))
    # The same position sampled again (a recompute) rolls the matcher back first.
    logits = torch.zeros(1, vocab)
    registry.apply(_Plan(["g"], [0]), logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == allowed
    registry.unregister("g")
    assert registry.apply(_Plan(["g"], [1]), torch.zeros(1, vocab)) is None


def test_open_schemas_are_strict_by_default_and_can_be_relaxed(llm):
    from fastllm import SamplingParams
    from fastllm.guided.params import GuidedDecodingParams, strict_schema

    schema = {"type": "object", "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "object",
                                            "properties": {"k": {"type": "string"}}}},
        "meta": {"type": "object", "additionalProperties": {"type": "integer"}}},
        "required": ["name"]}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["tags"]["items"]["additionalProperties"] is False
    assert strict["properties"]["meta"]["additionalProperties"] == {"type": "integer"}
    assert "additionalProperties" not in schema  # the request's schema is not changed
    assert '"additionalProperties": false' not in GuidedDecodingParams(
        json=schema, json_strict=False).spec()

    small = {"type": "object", "properties": {"city": {"type": "string"}},
             "required": ["city"]}
    params = [SamplingParams(max_tokens=64, temperature=t, seed=3,
                             guided_decoding=GuidedDecodingParams(json=small))
              for t in (0.0, 1.0)]
    prompt = "Give the city where the Eiffel Tower stands as JSON: "
    for out in llm.generate([prompt, prompt], params, use_tqdm=False):
        value = json.loads(out.outputs[0].text)
        assert set(value) == {"city"}
