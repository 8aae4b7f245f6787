"""Mistral tool calls: ``[TOOL_CALLS]`` followed by a JSON array of
``{"name": ..., "arguments": {...}}`` objects. ``[TOOL_CALLS]`` is a special token of Mistral's
tokenizers, so requests parsed this way keep special tokens in their text."""

from __future__ import annotations

import json

from fastllm.entrypoints.openai.tool_parsers.base import (
    CallStreamer,
    ToolCall,
    ToolParser,
    ToolStream,
    call_from_object,
    partial_suffix,
)

MARKER = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    keep_special_tokens = True

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if MARKER not in text:
            return text, []
        before, after = text.split(MARKER, 1)
        after = after.strip()
        try:
            value, _ = json.JSONDecoder().raw_decode(after)
        except json.JSONDecodeError:
            return text, []
        items = value if isinstance(value, list) else [value]
        calls = [call_from_object(item) for item in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return before.strip() or None, calls

    def stream(self) -> ToolStream:
        return _MistralStream()


class _MistralStream(ToolStream):
    def __init__(self):
        self.buf = ""
        self.in_tools = False
        self.streamer: CallStreamer | None = None
        self.depth = 0
        self.in_string = False
        self.escape = False
        self._calls: list[ToolCall] = []
        self.failed_text = ""

    @property
    def calls(self) -> list[ToolCall]:
        return self._calls

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if not self.in_tools:
            self.buf += text
            i = self.buf.find(MARKER)
            if i < 0:
                cut = len(self.buf) - partial_suffix(self.buf, MARKER)
                content, self.buf = self.buf[:cut], self.buf[cut:]
                return content, []
            content = self.buf[:i]
            text, self.buf = self.buf[i + len(MARKER):], ""
            self.in_tools = True
            _, deltas = self._feed_tools(text)
            return content, deltas
        return self._feed_tools(text)

    def _feed_tools(self, text: str) -> tuple[str, list[dict]]:
        deltas: list[dict] = []
        segment = ""
        for ch in text:
            if self.streamer is None:
                if ch == "{":
                    self.streamer = CallStreamer(len(self._calls))
                    self.depth, self.in_string, self.escape = 1, False, False
                    segment = ch
                continue  # "[", "," and whitespace between objects
            segment += ch
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    deltas += self.streamer.feed(segment)
                    segment = ""
                    more, call = self.streamer.close()
                    if call is not None:
                        self._calls.append(call)
                        deltas += more
                    self.streamer = None
        if self.streamer is not None and segment:
            deltas += self.streamer.feed(segment)
        return "", deltas

    def finish(self) -> tuple[str, list[dict]]:
        if not self.in_tools:
            rest, self.buf = self.buf, ""
            return rest, []
        if self.streamer is not None:
            more, call = self.streamer.close()
            self.streamer = None
            if call is not None:
                self._calls.append(call)
                return "", more
        return "", []
