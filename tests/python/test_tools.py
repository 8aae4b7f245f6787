"""Tool calling: the parsers (whole and streamed, parallel calls, malformed text), and the server
through the official openai client: named and required tool_choice (arguments always match the
schema), auto with the Hermes parser (the model's output forced by a grammar, so the path is
deterministic end to end), streaming deltas, and a tool-result round trip."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from fastllm.entrypoints.openai.tool_parsers import get_tool_parser
from fastllm.entrypoints.openai.tool_parsers.chat_tools import ToolRequestError, plan_tools
from test_server import MODEL, start_server, stop_server

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


# ---- parsers --------------------------------------------------------------------------------

HERMES_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
    '{"timezone": "Europe/Paris \\"}\\" x"}}\n</tool_call>')
MISTRAL_TEXT = (
    'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
    '"celsius"}}, {"name": "get_time", "arguments": {"timezone": "}]"}}]')


def _assemble(parser, text: str, step: int) -> tuple[str, list[dict]]:
    stream = parser.stream()
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = stream.feed(text[i:i + step])
        content, deltas = content + c, deltas + d
    c, d = stream.finish()
    content, deltas = content + c, deltas + d
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in d:
            assert call["id"] is None and call["arguments"] == ""  # the header comes first
            call["id"], call["name"] = d["id"], d["function"]["name"]
            assert d["type"] == "function"
        call["arguments"] += d["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name, text", [("hermes", HERMES_TEXT), ("mistral", MISTRAL_TEXT)])
def test_parser_whole_and_streamed_agree(name, text):
    parser = get_tool_parser(name)
    content, calls = parser.extract(text)
    assert content in ("Let me check.", "Sure")
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    for step in (1, 2, 5, 13, len(text)):
        streamed_content, streamed = _assemble(parser, text, step)
        assert streamed_content.strip() == content
        assert [c["name"] for c in streamed] == [c.name for c in calls]
        assert [json.loads(c["arguments"]) for c in streamed] == \
            [json.loads(c.arguments) for c in calls]
        assert len({c["id"] for c in streamed}) == 2


@pytest.mark.parametrize("text", [
    "no tools here, just <b>text</b>",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
])
def test_hermes_malformed_stays_content(text):
    parser = get_tool_parser("hermes")
    assert parser.extract(text) == (text, [])
    content, calls = _assemble(parser, text, 3)
    assert content == text and calls == []


def test_hermes_unclosed_block_and_arguments_first():
    parser = get_tool_parser("hermes")
    text = '<tool_call>{"arguments": {"timezone": "UTC"}, "name": "get_time"}'
    content, calls = parser.extract(text)
    assert content is None and calls[0].name == "get_time"
    _, streamed = _assemble(parser, text, 4)
    assert streamed[0]["name"] == "get_time"
    assert json.loads(streamed[0]["arguments"]) == {"timezone": "UTC"}


def test_mistral_malformed_stays_content():
    parser = get_tool_parser("mistral")
    text = "[TOOL_CALLS] [{broken"
    assert parser.extract(text) == (text, [])


def test_plan_tools_modes_and_errors():
    assert plan_tools(None, None, None, False, None).mode == "none"
    assert plan_tools(TOOLS, None, None, False, None).mode == "none"
    assert plan_tools(TOOLS, None, None, True, "hermes").mode == "auto"
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None,
                       False, None)
    assert named.mode == "named" and named.function["name"] == "get_time"
    assert plan_tools(TOOLS, "required", False, False, None).parallel is False
    with pytest.raises(ToolRequestError, match="--enable-auto-tool-choice"):
        plan_tools(TOOLS, "auto", None, False, None)
    with pytest.raises(ToolRequestError, match="not in tools"):
        plan_tools(TOOLS, {"type": "function", "function": {"name": "nope"}}, None, False, None)
    with pytest.raises(ToolRequestError, match="needs tools"):
        plan_tools(None, "required", None, False, None)
    with pytest.raises(ToolRequestError):
        plan_tools([{"type": "function"}], "required", None, False, None)


# ---- server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    proc, base = start_server(["--max-model-len", "2048", "--disable-log-stats",
                               "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _check_calls(calls):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream_calls(stream) -> tuple[str, list[dict], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    call["id"] = d.id
                if d.function and d.function.name:
                    call["name"] = d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_named_tool_choice(client):
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=temperature, seed=5,
            max_tokens=100,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        msg = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
        _check_calls(msg.tool_calls)


def test_named_tool_choice_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0.7, seed=2, max_tokens=100,
        stream=True, tool_choice={"type": "function", "function": {"name": "get_time"}})
    content, calls, finish = _stream_calls(stream)
    assert content == "" and finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_time"] and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME)


def test_required_tool_choice(client):
    for seed in range(2):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
            seed=seed, max_tokens=200, parallel_tool_calls=False)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls)


def test_required_tool_choice_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.5,
        seed=1, max_tokens=300, stream=True)
    _, calls, finish = _stream_calls(stream)
    assert finish == "tool_calls" and calls
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


# The model's reply is forced (a Lark grammar) to some content and two Hermes tool calls.
FORCED = ('start: "I will check both.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", '
          '\\"arguments\\": {\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}}\\n</tool_call>'
          '\\n<tool_call>\\n{\\"name\\": \\"get_time\\", \\"arguments\\": {\\"timezone\\": '
          '\\"Europe/Paris\\"}}\\n</tool_call>"\n')


def test_auto_tool_choice_hermes_forced(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                         tool_choice="auto", temperature=0, max_tokens=200,
                                         extra_body={"guided_grammar": FORCED})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check both."
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(choice.message.tool_calls[1].function.arguments) == \
        {"timezone": "Europe/Paris"}
    _check_calls(choice.message.tool_calls)

    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                            tool_choice="auto", temperature=0, max_tokens=200,
                                            stream=True, extra_body={"guided_grammar": FORCED})
    content, calls, finish = _stream_calls(stream)
    assert finish == "tool_calls"
    assert content.strip() == "I will check both."
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == \
        [json.loads(c.function.arguments) for c in choice.message.tool_calls]


def test_auto_without_a_call_is_plain_content(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                         temperature=0, max_tokens=20,
                                         extra_body={"guided_regex": "It is sunny\\."})
    choice = out.choices[0]
    assert choice.message.content == "It is sunny." and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_tool_result_round_trip(server, client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK,
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": call.id, "type": "function",
                                 "function": {"name": call.function.name,
                                              "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=30)
    assert second.choices[0].message.content
    assert not second.choices[0].message.tool_calls
    # the rendered prompt carries the earlier call and the tool's answer
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages},
                   timeout=30)
    assert r.status_code == 200
    text = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]},
                      timeout=30).json()
    assert "get_weather" in text["prompt"] and "22 degrees and sunny" in text["prompt"]


def test_tool_errors_are_400(server):
    def post(body):
        return httpx.post(f"{server}/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body},
                          timeout=30)

    r = post({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert r.status_code == 400 and "not in tools" in r.json()["error"]["message"]
    r = post({"tool_choice": "required"})
    assert r.status_code == 400
    r = post({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}],
              "tool_choice": "required"})
    assert r.status_code == 400
    r = post({"tools": TOOLS, "tool_choice": {"type": "function",
                                               "function": {"name": "get_time"}},
              "guided_regex": "a"})
    assert r.status_code == 400


def test_auto_needs_the_server_flags():
    proc, base = start_server(["--max-model-len", "512", "--disable-log-stats"])
    try:
        r = httpx.post(f"{base}/v1/chat/completions",
                       json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                             "tool_choice": "auto", "max_tokens": 5}, timeout=30)
        assert r.status_code == 400
        assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
        # tools without a tool_choice are fine: plain chat
        r = httpx.post(f"{base}/v1/chat/completions",
                       json={"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 5},
                       timeout=30)
        assert r.status_code == 200
    finally:
        stop_server(proc)


def test_named_tool_call_without_additional_properties_is_valid_json_in_64_tokens(client):
    """A schema that does not close its objects: strict by default, so the small model cannot
    invent keys until max_tokens cuts the call mid-string."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[tool], temperature=temperature, seed=11,
            max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = out.choices[0].message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert set(args) == {"city"} and isinstance(args["city"], str)
