"""The tool-call parsers a server can be started with (`--tool-call-parser`), by name."""
from __future__ import annotations

from rayinfer.cluster.openai.tool_parsers.base import ToolCallParser
from rayinfer.cluster.openai.tool_parsers.hermes import HermesToolCallParser
from rayinfer.cluster.openai.tool_parsers.llama3_json import Llama3JsonToolCallParser
from rayinfer.cluster.openai.tool_parsers.mistral import MistralToolCallParser
from rayinfer.cluster.openai.tool_parsers.qwen_xml import QwenXmlToolCallParser

PARSERS: dict[str, type[ToolCallParser]] = {
    parser.name: parser
    for parser in (HermesToolCallParser, Llama3JsonToolCallParser, MistralToolCallParser, QwenXmlToolCallParser)
}


def get_tool_call_parser(name: str) -> ToolCallParser:
    parser = PARSERS.get(name)
    if parser is None:
        raise ValueError(f"unknown tool call parser {name!r}; the known parsers are: {', '.join(sorted(PARSERS))}")
    return parser()
