"""Tools in chat completions: which tool_choice mode a request is in, how tools and earlier tool
calls reach the chat template, the guided decoding that forces calls, and how the output turns
back into ``tool_calls`` (whole or streamed).

* ``none`` (or no tools): plain chat.
* named (``{"type": "function", "function": {"name": N}}``): the output is forced to a JSON
  object valid against N's parameters schema; it becomes one call of N.
* ``required``: the output is forced to one or more Hermes blocks
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (one, when
  parallel_tool_calls is false) whose arguments follow the chosen tool's schema; the Hermes
  parser reads them back.
* ``auto``: the model decides; its text goes through the server's --tool-call-parser.
"""

from __future__ import annotations

import json
from typing import Any

from fastllm.entrypoints.openai.tool_parsers.base import ToolCall, ToolStream, tool_call_id
from fastllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from fastllm.guided.params import GuidedDecodingParams


class ToolRequestError(ValueError):
    def __init__(self, message: str, param: str = "tool_choice"):
        super().__init__(message)
        self.param = param


_EMPTY_PARAMS = {"type": "object", "properties": {}}

_SYSTEM_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with "
    "the user query. The function signatures are within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\nFor each function call, return a JSON object with the function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def _parameters(function: dict) -> dict:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else dict(_EMPTY_PARAMS)


class ToolPlan:
    def __init__(self, mode: str, tools: list[dict], function: dict | None = None,
                 parser=None, parallel: bool = True):
        self.mode = mode
        self.tools = tools
        self.function = function
        self.parser = parser
        self.parallel = parallel

    # ---- prompt ------------------------------------------------------------------------------

    def prepare_conversation(self, conversation: list[dict], template: str | None
                             ) -> list[dict]:
        """Messages ready for the template. Templates that do not know tools get the tools as
        a system prompt, and earlier calls as Hermes blocks in the assistant's text."""
        source = template or ""
        knows_calls = "tool_calls" in source
        out = []
        for m in conversation:
            m = dict(m)
            calls = m.get("tool_calls")
            if calls:
                calls = [_call_for_template(c) for c in calls]
                if knows_calls:
                    m["tool_calls"] = calls
                else:
                    m.pop("tool_calls")
                    blocks = "\n".join(
                        "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                      "arguments": c["function"]["arguments"]},
                                                     ensure_ascii=False) + "\n</tool_call>"
                        for c in calls)
                    m["content"] = ((m.get("content") or "") + "\n" + blocks).lstrip("\n")
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        if self.mode != "none" and self.tools and "tools" not in source.replace("tool_calls",
                                                                                  ""):
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
            prompt = _SYSTEM_PROMPT.format(tools=listing)
            if out and out[0].get("role") == "system":
                out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def template_tools(self) -> list[dict] | None:
        return self.tools if self.mode != "none" and self.tools else None

    # ---- decoding ----------------------------------------------------------------------------

    def guided(self, backend: str | None) -> GuidedDecodingParams | None:
        if self.mode == "named":
            return GuidedDecodingParams(json=_parameters(self.function), backend=backend)
        if self.mode == "required":
            return GuidedDecodingParams(grammar=self.required_grammar(), backend=backend)
        return None

    def required_grammar(self) -> str:
        alternatives = [{
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]},
                           "arguments": _parameters(t["function"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        } for t in self.tools]
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        call = '"<tool_call>\\n" %json ' + json.dumps(schema) + ' "\\n</tool_call>"'
        start = 'call ("\\n" call)*' if self.parallel else "call"
        return f"start: {start}\ncall: {call}\n"

    # ---- output ------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            return None, [ToolCall(self.function["name"], text.strip())]
        if self.mode == "required":
            content, calls = HermesToolParser().extract(text)
            return (None, calls) if calls else (content, calls)
        if self.mode == "auto":
            return self.parser.extract(text)
        return text, []

    def stream(self) -> ToolStream:
        if self.mode == "named":
            return _NamedStream(self.function["name"])
        if self.mode == "required":
            return HermesToolParser().stream()
        return self.parser.stream()

    @staticmethod
    def finish_reason(reason: str | None, calls: list) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason


class _NamedStream(ToolStream):
    """The whole output is the arguments of one call."""

    def __init__(self, name: str):
        self.call = ToolCall(name, "", id=tool_call_id())
        self.started = False

    @property
    def calls(self) -> list[ToolCall]:
        return [self.call] if self.started else []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        deltas = []
        if not self.started:
            self.started = True
            deltas.append({"index": 0, "id": self.call.id, "type": "function",
                           "function": {"name": self.call.name, "arguments": ""}})
        if text:
            self.call.arguments += text
            deltas.append({"index": 0, "function": {"arguments": text}})
        return "", deltas

    def finish(self) -> tuple[str, list[dict]]:
        return ("", self.feed("")[1]) if not self.started else ("", [])


def _call_for_template(call: dict) -> dict:
    """An assistant message's tool call with its arguments as an object (as HF chat templates
    expect), not the JSON text the OpenAI API carries."""
    call = dict(call)
    function = dict(call.get("function") or {})
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            function["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    call["function"] = function
    call.setdefault("type", "function")
    return call


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice, parallel_tool_calls: bool | None,
               enable_auto: bool, parser_name: str | None) -> ToolPlan:
    """The request's tool mode. ToolRequestError (a ValueError with the offending param) for
    malformed tools or a choice the server cannot honour."""
    from fastllm.entrypoints.openai.tool_parsers import get_tool_parser

    tools = list(tools or [])
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if (not isinstance(t, dict) or t.get("type", "function") != "function"
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or not fn["name"]):
            raise ToolRequestError("each tool must be {\"type\": \"function\", \"function\": "
                                   "{\"name\": ..., \"parameters\": {...}}}", param="tools")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolRequestError(f"tool {fn['name']!r}: parameters must be a JSON schema "
                                   "object", param="tools")
    parallel = parallel_tool_calls is not False
    choice = tool_choice
    if choice is None:
        choice = "auto" if tools and enable_auto else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else {}
        name = fn.get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolRequestError("a named tool_choice is {\"type\": \"function\", "
                                   "\"function\": {\"name\": ...}}")
        for t in tools:
            if t["function"]["name"] == name:
                return ToolPlan("named", tools, t["function"], parallel=parallel)
        raise ToolRequestError(f"tool_choice names the function {name!r}, which is not in "
                               "tools")
    if choice == "none":
        return ToolPlan("none", tools)
    if choice not in ("auto", "required"):
        raise ToolRequestError(f"tool_choice must be 'none', 'auto', 'required' or a named "
                               f"function, got {choice!r}")
    if not tools:
        raise ToolRequestError(f"tool_choice {choice!r} needs tools")
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel)
    if not (enable_auto and parser_name):
        raise ToolRequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                               "--tool-call-parser to be set")
    return ToolPlan("auto", tools, parser=get_tool_parser(parser_name), parallel=parallel)
