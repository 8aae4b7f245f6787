"""Turning model text into OpenAI tool calls, whole or as streaming deltas.

A parser finds calls written as JSON objects ``{"name": ..., "arguments": {...}}`` in the
model's own format. Non-streaming, :meth:`ToolParser.extract` returns the remaining content and
the calls; text that does not parse stays content. Streaming, :meth:`ToolParser.stream` gives a
:class:`ToolStream` that turns text deltas into chat-completion deltas: content as it comes, and
for each call first ``{index, id, type, function: {name, arguments: ""}}`` then the argument
text in fragments, which concatenate to a JSON document equal to the non-streaming arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = tool_call_id()

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def call_from_object(obj) -> ToolCall | None:
    """A call from a parsed ``{"name": ..., "arguments"|"parameters": ...}``; None otherwise."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # Some models write the arguments as a JSON string.
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                     r'\s*:\s*')


class CallStreamer:
    """Streams one call object as its text arrives: the header once the name is known, then the
    raw argument text up to where the arguments value ends (found by scanning JSON nesting, so
    nothing after the value is ever sent)."""

    def __init__(self, index: int):
        self.index = index
        self.id = tool_call_id()
        self.text = ""
        self.name: str | None = None
        self.args_start = -1
        self.scan = 0  # how far the argument scanner has read
        self.sent = 0  # argument characters sent
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.ended = False

    def _header(self, name: str) -> dict:
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _args(self, text: str) -> dict:
        return {"index": self.index, "function": {"arguments": text}}

    def feed(self, text: str) -> list[dict]:
        self.text += text
        out: list[dict] = []
        if self.name is None:
            m = _HEADER.match(self.text)
            if m is None:
                return out
            try:
                self.name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                return out
            self.args_start = self.scan = m.end()
            out.append(self._header(self.name))
        self._scan()
        end = self.scan
        if end - self.args_start > self.sent:
            out.append(self._args(self.text[self.args_start + self.sent: end]))
            self.sent = end - self.args_start
        return out

    def _scan(self) -> None:
        text = self.text
        i = self.scan
        while i < len(text) and not self.ended:
            ch = text[i]
            if not self.started:
                if ch.isspace():
                    i += 1
                    self.args_start = i
                    continue
                self.started = True
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.ended = True
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:
                    self.ended = True  # a scalar value ended before this character
                    break
                self.depth -= 1
                if self.depth == 0:
                    self.ended = True
            elif self.depth == 0 and (ch == "," or ch.isspace()):
                self.ended = True
                break
            i += 1
        self.scan = i

    def close(self) -> tuple[list[dict], ToolCall | None]:
        """The object's text is complete: parses it and sends what is missing. Returns the
        deltas and the call, or no call when the text is not a call object."""
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError:
            obj = None
        call = call_from_object(obj)
        if call is None:
            return [], None
        call.id = self.id
        if self.name is None or self.name != call.name:
            # The header never streamed (e.g. arguments before name): send it all now.
            return [self._header(call.name), self._args(call.arguments)], call
        out = []
        raw = self.text[self.args_start: self.scan].strip()
        if len(raw) > self.sent:
            out.append(self._args(raw[self.sent:]))
        try:
            json.loads(raw)
        except json.JSONDecodeError:
            return out, call
        call.arguments = raw  # what the stream sent, so both views agree
        return out, call


class ToolStream(ABC):
    """Streaming state of one choice."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[dict]]:
        """Content text and tool-call deltas for a new piece of model text."""
        ...

    @abstractmethod
    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end of generation."""
        ...

    @property
    @abstractmethod
    def calls(self) -> list[ToolCall]:
        ...


class ToolParser(ABC):
    name = ""
    # Whether the model's tool markers are special tokens that decoding must keep.
    keep_special_tokens = False

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        ...

    @abstractmethod
    def stream(self) -> ToolStream:
        ...


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
