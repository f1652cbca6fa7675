"""Tool calls in chat completions: parsers that read them from a model's output, whole or streamed, in the formats
models write them (`PARSERS`), and for forced calls (`tool_choice` "required" or a named function) the JSON schemas
that constrain the output and the parsers that read it."""
from rayinfer.cluster.openai.tool_parsers.base import ParsedText, ToolCall, ToolCallParser
from rayinfer.cluster.openai.tool_parsers.forced import (
    NamedToolCallParser,
    RequiredToolCallParser,
    named_tool_schema,
    required_tools_schema,
)
from rayinfer.cluster.openai.tool_parsers.hermes import HermesToolCallParser
from rayinfer.cluster.openai.tool_parsers.llama3_json import Llama3JsonToolCallParser
from rayinfer.cluster.openai.tool_parsers.mistral import MistralToolCallParser
from rayinfer.cluster.openai.tool_parsers.qwen_xml import QwenXmlToolCallParser
from rayinfer.cluster.openai.tool_parsers.registry import PARSERS, get_tool_call_parser
from rayinfer.cluster.openai.tool_parsers.streaming import (
    StreamDelta,
    ToolCallStream,
    parse_tool_calls,
    tool_call_id,
)

__all__ = [
    "PARSERS",
    "HermesToolCallParser",
    "Llama3JsonToolCallParser",
    "MistralToolCallParser",
    "NamedToolCallParser",
    "ParsedText",
    "QwenXmlToolCallParser",
    "RequiredToolCallParser",
    "StreamDelta",
    "ToolCall",
    "ToolCallParser",
    "ToolCallStream",
    "get_tool_call_parser",
    "named_tool_schema",
    "parse_tool_calls",
    "required_tools_schema",
    "tool_call_id",
]
