"""Forced tool calls: `tool_choice` "required" or a named function. The engine constrains the output with a JSON
schema grammar (the schemas here, vLLM's shapes), so these parsers read JSON that is well formed unless it was cut
short; a cut-short output goes back into the content like any broken call.
"""
from __future__ import annotations

from typing import Any, Optional

from rayinfer.cluster.openai.tool_parsers.base import BlockScan, BlockToolCallParser, ToolCall
from rayinfer.cluster.openai.tool_parsers.call_json import scan_arguments_object, scan_call_array
from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, skip_ws

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _functions(tools: list[dict]) -> list[dict]:
    return [tool["function"] for tool in tools if tool.get("type", "function") == "function"]


def _parameters(function: dict) -> dict:
    return function.get("parameters") or dict(ANY_OBJECT)


def required_tools_schema(tools: list[dict], parallel_tool_calls: bool) -> dict:
    """A JSON array of at least one call `{"name": NAME, "parameters": {...}}` to any of `tools` (at most one unless
    `parallel_tool_calls`). Each tool's `$defs` move to the top, where its `$ref`s ("#/$defs/...") now point."""
    defs: dict[str, Any] = {}
    choices = []
    for function in _functions(tools):
        parameters = dict(_parameters(function))
        for def_name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(def_name, definition) != definition:
                raise ValueError(f"tools define $defs/{def_name} differently; rename one of them")
        choices.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "parameters": parameters},
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": choices}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def named_tool_schema(tools: list[dict], name: str) -> dict:
    """The parameters schema of the tool called `name`: the whole output is its arguments."""
    functions = _functions(tools)
    for function in functions:
        if function.get("name") == name:
            return _parameters(function)
    known = ", ".join(function.get("name", "?") for function in functions) or "none"
    raise ValueError(f"no tool is named {name!r} (the tools are: {known})")


class RequiredToolCallParser(BlockToolCallParser):
    """The output of `required_tools_schema`: `[{"name": ..., "parameters": {...}}, ...]`."""

    name = "required"

    def find_block(self, text: str, pos: int, after_call: bool) -> Optional[tuple[int, int]]:
        if after_call:
            return None
        i = skip_ws(text, 0)
        return (0, i + 1) if i < len(text) and text[i] == "[" else None

    def held_tail(self, tail: str, after_call: bool) -> int:
        return len(tail) if not after_call and not tail.strip() else 0

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        return scan_call_array(text, body, final, ("parameters",), self.memo)


class NamedToolCallParser(BlockToolCallParser):
    """The output of `named_tool_schema`: the arguments object of one call to `function_name`, listed from the
    start since its name is known before the model writes anything."""

    name = "named"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.function_name = name

    def find_block(self, text: str, pos: int, after_call: bool) -> Optional[tuple[int, int]]:
        return None if after_call else (0, 0)

    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        j = skip_ws(text, body)
        if j >= len(text):
            return BlockScan(Progress.BAD if final else Progress.OPEN, body, [ToolCall(self.function_name, "")])
        value = scan_arguments_object(text, j, self.memo) if text[j] == "{" else None
        arguments = "" if value is None else text[j:value.end]
        call = [ToolCall(self.function_name, arguments)]
        if value is not None and value.progress is Progress.DONE:
            return BlockScan(Progress.DONE, value.end, call, 1)
        if value is not None and value.progress is Progress.OPEN and not final:
            return BlockScan(Progress.OPEN, body, call)
        return BlockScan(Progress.BAD, body, call)
