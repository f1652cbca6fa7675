"""Tool calls as the OpenAI API sends them: whole in a chat message, or as `chat.completion.chunk` deltas.

A `ToolCallStream` parses the whole output so far at each step and sends what grew since the last: new content,
a new call (its id, type, name and the arguments so far), or more of a call's arguments. Joining a call's argument
pieces gives its final arguments text. A call that was sent and then turns out broken at the final parse cannot be
taken back: it stays as sent, and its text, which the final parse returns as content, follows as content.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from rayinfer.cluster.openai.tool_parsers.base import ParsedText, ToolCall, ToolCallParser


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def message_tool_call(call_id: str, call: ToolCall) -> dict:
    """A call in a chat message's `tool_calls`."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def parse_tool_calls(
    parser: ToolCallParser, text: str, parallel_tool_calls: bool = True
) -> tuple[Optional[str], list[dict]]:
    """A whole output as (its content, None when empty or only whitespace; its calls, message-shaped with fresh ids).
    Without `parallel_tool_calls` only the first call is kept, as vLLM does."""
    parsed = parser.parse(text, final=True)
    calls = parsed.tool_calls if parallel_tool_calls else parsed.tool_calls[:1]
    content = parsed.content if parsed.content.strip() else None
    return content, [message_tool_call(tool_call_id(), call) for call in calls]


@dataclass
class StreamDelta:
    content: str  # new content text ("" when none)
    tool_calls: list[dict]  # OpenAI delta `tool_calls` entries


class ToolCallStream:
    """One streamed output's tool calls: `feed` it the whole text at each step, then `finish` it once."""

    def __init__(self, parser: ToolCallParser, parallel_tool_calls: bool = True) -> None:
        self._parser = parser
        self._parallel = parallel_tool_calls
        self._content = ""  # the content sent so far
        self._ids: list[str] = []
        self._sent: list[ToolCall] = []  # each call as sent so far: its name and the arguments joined

    def feed(self, text: str) -> StreamDelta:
        return self._advance(self._parser.parse(text, final=False))

    def finish(self, text: str) -> StreamDelta:
        """The final parse: sends the content held back and the rest of the arguments."""
        return self._advance(self._parser.parse(text, final=True))

    @property
    def tool_calls(self) -> list[dict]:
        """The calls sent so far, message-shaped."""
        return [message_tool_call(call_id, call) for call_id, call in zip(self._ids, self._sent)]

    def _advance(self, parsed: ParsedText) -> StreamDelta:
        return StreamDelta(self._new_content(parsed.content), self._new_call_pieces(parsed.tool_calls))

    def _new_content(self, content: str) -> str:
        # Content that is only whitespace so far (say, the newline before a call) waits: a message whose content is
        # only whitespace has none. Parsers only ever append to it, which the prefix check relies on.
        if not content.strip() or not content.startswith(self._content):
            return ""
        piece, self._content = content[len(self._content):], content
        return piece

    def _new_call_pieces(self, calls: list[ToolCall]) -> list[dict]:
        if not self._parallel:
            calls = calls[:1]
        pieces: list[dict] = []
        matched = 0
        for index, sent in enumerate(self._sent):
            if matched >= len(calls):
                break
            call = calls[matched]
            if call.name != sent.name or not call.arguments.startswith(sent.arguments):
                continue  # this call was sent, then broke at the final parse: it stays as sent
            matched += 1
            more = call.arguments[len(sent.arguments):]
            if more:
                pieces.append({"index": index, "function": {"arguments": more}})
                sent.arguments = call.arguments
        for call in calls[matched:]:
            if not self._parallel and self._sent:
                break
            index = len(self._sent)
            self._ids.append(tool_call_id())
            self._sent.append(ToolCall(call.name, call.arguments))
            pieces.append({
                "index": index, "id": self._ids[index], "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            })
        return pieces
