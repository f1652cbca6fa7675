"""Hermes-style tool calls (Hermes 2/3, Qwen2.5, Qwen3): each call a JSON object inside its own tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with content before, between and after the calls. The call's JSON is scanned rather than searched for the closing
tag, so "</tool_call>" inside an argument string does not end the call.
"""
from __future__ import annotations

from rayinfer.cluster.openai.tool_parsers.base import BlockScan, MarkedToolCallParser, close_with_marker
from rayinfer.cluster.openai.tool_parsers.call_json import scan_block_call


class HermesToolCallParser(MarkedToolCallParser):
    name = "hermes"
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        call = scan_block_call(text, body, final, ("arguments", "parameters"), self.memo)
        if isinstance(call, BlockScan):
            return call
        return close_with_marker(text, call.end, self.end_marker, final, call.listed())
