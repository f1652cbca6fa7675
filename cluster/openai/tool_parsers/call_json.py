"""Tool calls written as JSON objects, `{"name": "f", "arguments": {...}}`, alone or in a JSON array, on text that
may be cut short.

The arguments are kept as the raw text the model wrote (nothing normalised), so that while streaming they are a
prefix of what the final parse gives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from rayinfer.cluster.openai.tool_parsers.base import BlockScan, ToolCall, block_start
from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, Scan, scan_string, scan_value, skip_ws
from rayinfer.cluster.openai.tool_parsers.memo import GrowingTextMemo


@dataclass(frozen=True)
class CallObjectScan:
    progress: Progress
    end: int  # as in `json_scan.Scan`
    name: Optional[str]  # once its string is complete
    arguments: Optional[str]  # the arguments text so far; None before its value starts

    def listed(self) -> list[ToolCall]:
        """The call as a streaming parse lists it: once its name is known."""
        return [] if self.name is None else [ToolCall(self.name, self.arguments or "")]


def scan_call_object(
    text: str, i: int, argument_keys: tuple[str, ...], memo: Optional[GrowingTextMemo] = None
) -> CallObjectScan:
    """The call object whose "{" is text[i]: a non-empty string "name" and an object under one of `argument_keys`
    (absent: "{}"); other keys are allowed and ignored. Its arguments are always a JSON object when DONE."""
    key = ("call_object", i)
    known = memo.get(key) if memo is not None else None
    if known is not None:
        return known
    scan = _scan_call_object(text, i, argument_keys, memo)
    if memo is not None and scan.progress is not Progress.OPEN:
        memo.put(key, scan)  # settled, whatever follows
    return scan


def scan_block_call(
    text: str, body: int, final: bool, argument_keys: tuple[str, ...], memo: Optional[GrowingTextMemo] = None
) -> CallObjectScan | BlockScan:
    """A block whose body is one call object: the complete call, or the block's verdict while it is not (open
    while streaming, broken once final or when the body is not an object)."""
    j, ended = block_start(text, body, final)
    if ended is not None:
        return ended
    if text[j] != "{":
        return BlockScan(Progress.BAD, body)
    call = scan_call_object(text, j, argument_keys, memo)
    if call.progress is not Progress.DONE:
        return BlockScan(Progress.BAD if final else call.progress, body, call.listed())
    return call


def _scan_call_object(
    text: str, i: int, argument_keys: tuple[str, ...], memo: Optional[GrowingTextMemo]
) -> CallObjectScan:
    n = len(text)
    name: Optional[str] = None
    arguments: Optional[str] = None
    seen: set[str] = set()

    def stop(progress: Progress, end: int) -> CallObjectScan:
        return CallObjectScan(progress, end, name, arguments)

    j, first = i + 1, True
    while True:
        j = skip_ws(text, j)
        if j >= n:
            return stop(Progress.OPEN, n)
        if text[j] == "}" and first:
            return stop(Progress.BAD, j)  # {} names no function
        if text[j] != '"':
            return stop(Progress.BAD, j)
        key_scan = scan_string(text, j)
        if key_scan.progress is not Progress.DONE:
            return stop(key_scan.progress, key_scan.end)
        key = json.loads(text[j:key_scan.end])
        slot = "name" if key == "name" else "arguments" if key in argument_keys else None
        if slot is not None and slot in seen:
            return stop(Progress.BAD, j)
        j = skip_ws(text, key_scan.end)
        if j >= n:
            return stop(Progress.OPEN, n)
        if text[j] != ":":
            return stop(Progress.BAD, j)
        j = skip_ws(text, j + 1)
        if j >= n:
            return stop(Progress.OPEN, n)
        if (slot == "name" and text[j] != '"') or (slot == "arguments" and text[j] != "{"):
            return stop(Progress.BAD, j)
        if slot == "arguments":
            value = scan_arguments_object(text, j, memo)
            arguments = text[j:value.end]
        else:
            value = scan_value(text, j, memo)
        if value.progress is not Progress.DONE:
            return stop(value.progress, value.end)
        if slot == "name":
            name = json.loads(text[j:value.end])
            if not name:
                return stop(Progress.BAD, j)
        if slot is not None:
            seen.add(slot)
        j = skip_ws(text, value.end)
        if j >= n:
            return stop(Progress.OPEN, n)
        if text[j] == ",":
            j, first = j + 1, False
            continue
        if text[j] != "}" or name is None:
            return stop(Progress.BAD, j)
        if arguments is None:
            arguments = "{}"
        return stop(Progress.DONE, j + 1)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def scan_arguments_object(text: str, i: int, memo: Optional[GrowingTextMemo] = None) -> Scan:
    """The arguments object whose "{" is text[i]: DONE only once complete and loading as a JSON object."""
    key = ("arguments_object", i)
    known = memo.get(key) if memo is not None else None
    if known is not None:
        return known
    scan = scan_value(text, i, memo)
    if scan.progress is Progress.DONE and not is_json_object(text[i:scan.end]):
        scan = Scan(Progress.BAD, scan.end)
    if memo is not None and scan.progress is not Progress.OPEN:
        memo.put(key, scan)
    return scan


def scan_call_array(
    text: str, i: int, final: bool, argument_keys: tuple[str, ...], memo: Optional[GrowingTextMemo] = None
) -> BlockScan:
    """The JSON array of call objects whose "[" is just before text[i]. A final output that stops right after a
    complete call, without the closing "]", still counts."""
    n = len(text)
    calls: list[ToolCall] = []
    resume = i  # where content would resume if the array breaks: past its last complete call
    j = skip_ws(text, i)
    if j < n and text[j] == "]":
        return BlockScan(Progress.BAD, resume)  # an empty list of calls is not calls
    while True:
        if j >= n:
            return BlockScan(Progress.BAD if final else Progress.OPEN, resume, calls, len(calls))
        if text[j] != "{":
            return BlockScan(Progress.BAD, resume, calls, len(calls))
        call = scan_call_object(text, j, argument_keys, memo)
        if call.progress is not Progress.DONE:
            progress = Progress.BAD if final else call.progress
            return BlockScan(progress, resume, calls + call.listed(), len(calls))
        calls.extend(call.listed())
        resume = call.end
        j = skip_ws(text, call.end)
        if j >= n:
            if final:
                return BlockScan(Progress.DONE, n, calls, len(calls))
            return BlockScan(Progress.OPEN, resume, calls, len(calls))
        if text[j] == "]":
            return BlockScan(Progress.DONE, j + 1, calls, len(calls))
        if text[j] != ",":
            return BlockScan(Progress.BAD, resume, calls, len(calls))
        j = skip_ws(text, j + 1)
