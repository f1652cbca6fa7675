"""Mistral tool calls, after content, in either of the forms its tokenizers use:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]     (before v11)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}              (v11 and later)

The later form may carry an id, `name[CALL_ID]a1b2c3d4e[ARGS]{...}`, which is dropped (the server makes its own
ids); a name followed directly by its JSON object, as some tokenizers decode it, is read too.
"""
from __future__ import annotations

import re

from rayinfer.cluster.openai.tool_parsers.base import BlockScan, MarkedToolCallParser, ToolCall, block_start, cut_inside
from rayinfer.cluster.openai.tool_parsers.call_json import scan_arguments_object, scan_call_array
from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, skip_ws

ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
_CALL_ID_VALUE = re.compile(r"[A-Za-z0-9]*")


class MistralToolCallParser(MarkedToolCallParser):
    name = "mistral"
    start_marker = "[TOOL_CALLS]"

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        j, ended = block_start(text, body, final)
        if ended is not None:
            return ended
        if text[j] == "[":
            return scan_call_array(text, j + 1, final, ("arguments",), self.memo)
        return self._scan_named_call(text, body, j, final)

    def _scan_named_call(self, text: str, body: int, j: int, final: bool) -> BlockScan:
        """`name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`, or `name{...}`) starting at text[j]."""
        n = len(text)
        name_end = _NAME.match(text, j).end()
        unsettled = Progress.BAD if final else Progress.OPEN
        if name_end >= n:
            return BlockScan(unsettled, body)  # the name may go on
        if name_end == j or text[name_end] not in "[{":
            return BlockScan(Progress.BAD, body)
        listed = [ToolCall(text[j:name_end], "")]
        k = name_end
        if text.startswith(CALL_ID, k):
            k = _CALL_ID_VALUE.match(text, k + len(CALL_ID)).end()
        if text.startswith(ARGS, k):
            k = skip_ws(text, k + len(ARGS))
        elif cut_inside(text, k, CALL_ID) or cut_inside(text, k, ARGS):
            return BlockScan(unsettled, body, listed)
        if k >= n:
            return BlockScan(unsettled, body, listed)
        if text[k] != "{":
            return BlockScan(Progress.BAD, body, listed)
        value = scan_arguments_object(text, k, self.memo)
        listed = [ToolCall(listed[0].name, text[k:value.end])]
        if value.progress is Progress.DONE:
            return BlockScan(Progress.DONE, value.end, listed, 1)
        if value.progress is Progress.OPEN and not final:
            return BlockScan(Progress.OPEN, body, listed)
        return BlockScan(Progress.BAD, body, listed)
