"""Tool-call parsers for ``tool_choice="auto"`` (``--enable-auto-tool-choice
--tool-call-parser NAME``)."""

from fastllm.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, ToolStream
from fastllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from fastllm.entrypoints.openai.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "mistral": MistralToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from "
                         f"{', '.join(TOOL_PARSERS)}") from None


__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParser", "ToolStream", "get_tool_parser"]
