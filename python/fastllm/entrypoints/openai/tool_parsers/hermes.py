"""Hermes (Nous Research) tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks, any number of them, after optional content."""

from __future__ import annotations

import json
import re

from fastllm.entrypoints.openai.tool_parsers.base import (
    CallStreamer,
    ToolCall,
    ToolParser,
    ToolStream,
    call_from_object,
    partial_suffix,
)

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if OPEN not in text:
            return text, []
        calls = []
        for m in _BLOCK.finditer(text):
            body = m.group(1) if m.group(1) is not None else m.group(2)
            try:
                call = call_from_object(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # malformed: the whole text stays content
            calls.append(call)
        content = text[: text.index(OPEN)].strip()
        return content or None, calls

    def stream(self) -> ToolStream:
        return _HermesStream()


class _HermesStream(ToolStream):
    def __init__(self):
        self.buf = ""
        self.streamer: CallStreamer | None = None
        self.block = ""
        self._calls: list[ToolCall] = []
        self.seen_call = False

    @property
    def calls(self) -> list[ToolCall]:
        return self._calls

    def _content(self, text: str) -> str:
        # Whitespace around and between calls is not content.
        return "" if self.seen_call and not text.strip() else text

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, deltas = "", []
        while True:
            if self.streamer is None:
                i = self.buf.find(OPEN)
                if i < 0:
                    cut = len(self.buf) - partial_suffix(self.buf, OPEN)
                    content += self._content(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    return content, deltas
                content += self._content(self.buf[:i])
                self.buf = self.buf[i + len(OPEN):]
                self.streamer = CallStreamer(len(self._calls))
                self.block = ""
                self.seen_call = True
                continue
            j = self.buf.find(CLOSE)
            if j < 0:
                cut = len(self.buf) - partial_suffix(self.buf, CLOSE)
                deltas += self.streamer.feed(self.buf[:cut])
                self.block += self.buf[:cut]
                self.buf = self.buf[cut:]
                return content, deltas
            deltas += self.streamer.feed(self.buf[:j])
            self.block += self.buf[:j]
            self.buf = self.buf[j + len(CLOSE):]
            c, d = self._close(closed=True)
            content += c
            deltas += d

    def _close(self, closed: bool) -> tuple[str, list[dict]]:
        streamer = self.streamer
        self.streamer = None
        more, call = streamer.close()
        if call is not None:
            self._calls.append(call)
            return "", more
        if streamer.name is None:
            # Not a call: give the text back as content.
            return OPEN + self.block + (CLOSE if closed else ""), []
        return "", []

    def finish(self) -> tuple[str, list[dict]]:
        if self.streamer is None:
            rest, self.buf = self.buf, ""
            return self._content(rest), []
        deltas = self.streamer.feed(self.buf)
        self.block += self.buf
        self.buf = ""
        content, more = self._close(closed=False)
        return content, deltas + more
