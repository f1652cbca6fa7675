"""Qwen3-Coder XML tool calls: parameters as tagged text inside each call,

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value that reads as a JSON number, boolean, null, object or array is that; anything else is a string, less one
leading and one trailing newline. The arguments text is built so that it only grows while streaming: "{" once the
function is named, then each parameter once its closing tag is seen, then "}"; at the end it equals the
json.dumps of the arguments (without ASCII escaping).
"""
from __future__ import annotations

import json
from typing import Any, Union

from rayinfer.cluster.openai.tool_parsers.base import (
    BlockScan,
    MarkedToolCallParser,
    ToolCall,
    close_with_marker,
    cut_inside,
)
from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, skip_ws

FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"


def _open_tag(text: str, i: int, prefix: str) -> tuple[Progress, str, int]:
    """The tag `<function=NAME>` or `<parameter=NAME>` at text[i]: (progress, NAME, index past the tag)."""
    if not text.startswith(prefix, i):
        return (Progress.OPEN if cut_inside(text, i, prefix) else Progress.BAD), "", i
    start = i + len(prefix)
    close = text.find(">", start)
    name = text[start:] if close < 0 else text[start:close]
    if "\n" in name or "<" in name:
        return Progress.BAD, "", i
    if close < 0:
        return Progress.OPEN, "", i
    name = name.strip()
    return (Progress.DONE if name else Progress.BAD), name, close + 1


def _reject_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def parameter_value(raw: str) -> Any:
    """A parameter's text as its JSON value."""
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw
    return raw if isinstance(value, str) else value


def _member(key: str, value: Any) -> str:
    return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"


class QwenXmlToolCallParser(MarkedToolCallParser):
    name = "qwen"
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        unsettled = Progress.BAD if final else Progress.OPEN
        progress, name, j = _open_tag(text, skip_ws(text, body), FUNCTION)
        if progress is not Progress.DONE:
            return BlockScan(unsettled if progress is Progress.OPEN else Progress.BAD, body)
        members: list[str] = []
        keys: set[str] = set()

        def stop(progress: Progress) -> BlockScan:
            return BlockScan(progress, body, [ToolCall(name, "{" + ", ".join(members))])

        while True:
            j = skip_ws(text, j)
            if text.startswith(FUNCTION_END, j):
                call = ToolCall(name, "{" + ", ".join(members) + "}")
                return close_with_marker(text, j + len(FUNCTION_END), self.end_marker, final, [call])
            if cut_inside(text, j, FUNCTION_END):
                return stop(unsettled)
            parameter = self._parameter(text, j)
            if isinstance(parameter, Progress):
                return stop(unsettled if parameter is Progress.OPEN else Progress.BAD)
            key, member, j = parameter
            if key in keys:
                return stop(Progress.BAD)
            keys.add(key)
            members.append(member)

    def _parameter(self, text: str, i: int) -> Union[Progress, tuple[str, str, int]]:
        """The parameter at text[i] as (its name, its JSON member text, the index past it), once complete."""
        known = self.memo.get(("qwen_parameter", i))
        if known is not None:
            return known
        progress, key, value_start = _open_tag(text, i, PARAMETER)
        if progress is not Progress.DONE:
            return progress
        value_end = text.find(PARAMETER_END, value_start)
        if value_end < 0:
            return Progress.OPEN
        parameter = key, _member(key, parameter_value(text[value_start:value_end])), value_end + len(PARAMETER_END)
        self.memo.put(("qwen_parameter", i), parameter)
        return parameter
