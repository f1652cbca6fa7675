"""Llama 3.1/3.2 JSON tool calls: the whole output is one or more call objects separated by "; ", optionally after
the `<|python_tag|>` token,

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

("arguments" is accepted for "parameters"). An output that does not start (after whitespace and the tag) with "{"
is plain content; text after the calls is content too.
"""
from __future__ import annotations

from typing import Optional

from rayinfer.cluster.openai.tool_parsers.base import BlockScan, BlockToolCallParser, held_marker_prefix
from rayinfer.cluster.openai.tool_parsers.call_json import scan_block_call
from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, skip_ws

PYTHON_TAG = "<|python_tag|>"


def _after_tag(text: str) -> int:
    """Where the output proper starts: past leading whitespace and the python tag."""
    i = skip_ws(text, 0)
    return skip_ws(text, i + len(PYTHON_TAG)) if text.startswith(PYTHON_TAG, i) else i


class Llama3JsonToolCallParser(BlockToolCallParser):
    name = "llama3_json"

    def find_block(self, text: str, pos: int, after_call: bool) -> Optional[tuple[int, int]]:
        if not after_call:
            i = _after_tag(text)
            return (0, i) if i < len(text) and text[i] == "{" else None  # the whitespace and tag are markup
        j = skip_ws(text, pos)
        return (pos, j + 1) if j < len(text) and text[j] == ";" else None

    def held_tail(self, tail: str, after_call: bool) -> int:
        if after_call:
            return 0
        i = skip_ws(tail, 0)
        rest = tail[_after_tag(tail):]
        # Only whitespace and (part of) the tag so far: the calls may be about to start.
        if not rest or held_marker_prefix(tail[i:], PYTHON_TAG) == len(tail) - i:
            return len(tail)
        return 0

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        call = scan_block_call(text, body, final, ("parameters", "arguments"), self.memo)
        if isinstance(call, BlockScan):
            return call
        return BlockScan(Progress.DONE, call.end, call.listed(), 1)
