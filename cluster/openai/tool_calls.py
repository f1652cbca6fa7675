"""A chat request's tool calls: which parser reads them from the output, whole or streamed, as vLLM does.

`tool_choice` "none" parses nothing (the tools still reach the template); "auto" reads the model's own calls with
the server's parser (`--tool-call-parser`, vLLM's flag), and without one is refused; "required" and a named
function constrain the output to calls (`structured_fields`), so their parsers read JSON that is always well
formed. A choice that made calls and stopped on its own finishes with "tool_calls" (but for a named function:
"stop", as OpenAI answers).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from rayinfer.cluster.openai.request_models import ChatCompletionRequest
from rayinfer.cluster.openai.tool_parsers import (
    PARSERS,
    NamedToolCallParser,
    RequiredToolCallParser,
    StreamDelta,
    ToolCallParser,
    ToolCallStream,
    get_tool_call_parser,
    parse_tool_calls,
)
from rayinfer.scheduler.request_errors import InvalidRequestError


def check_tool_call_parser(name: Optional[str]) -> None:
    """A server's `tool_call_parser` setting, checked at startup: unknown names fail there, listing the known."""
    if name is None:
        return
    try:
        get_tool_call_parser(name)
    except ValueError as exc:
        raise ValueError(f"tool_call_parser (--tool-call-parser): {exc}") from None


@dataclass(frozen=True)
class ToolCalling:
    """How one chat request's outputs are read for tool calls: a fresh parser per choice. `named`: the request
    forced one function, whose call finishes with "stop" (as OpenAI and vLLM answer), not "tool_calls"."""

    make_parser: Callable[[], ToolCallParser]
    parallel_tool_calls: bool
    named: bool = False

    def finish_reason(self, finish_reason: Optional[str], made_calls: bool) -> Optional[str]:
        """'tool_calls' for a choice that called tools and stopped on its own; its own reason otherwise."""
        return "tool_calls" if made_calls and finish_reason == "stop" and not self.named else finish_reason

    def parse(self, text: str) -> tuple[Optional[str], list[dict]]:
        """A whole output as (content, or None when it is only calls; the calls, message-shaped with ids)."""
        return parse_tool_calls(self.make_parser(), text, self.parallel_tool_calls)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.make_parser(), self.parallel_tool_calls)


def tool_calling_for(body: ChatCompletionRequest, server_parser: Optional[str]) -> Optional[ToolCalling]:
    """How `body`'s output is read for calls (None: it is not), given the server's `tool_call_parser`; a
    `tool_choice` the request or the server cannot honour is refused naming it."""
    if body.tool_choice not in (None, "none") and body.tools is None:
        raise InvalidRequestError.about("tool_choice", "tool_choice needs tools, the functions it chooses from")
    choice = body.effective_tool_choice
    parallel = body.parallel_tool_calls
    if choice == "none":
        return None
    if choice == "auto":
        if server_parser is None:
            raise InvalidRequestError.about(
                "tool_choice", f'"auto" tool choice needs the server started with --tool-call-parser (one of '
                f'{", ".join(sorted(PARSERS))}); tool_choice "required" or a named function works without one')
        return ToolCalling(lambda: get_tool_call_parser(server_parser), parallel)
    if choice == "required":
        return ToolCalling(RequiredToolCallParser, parallel)
    name = choice.function.name
    known = [tool.function.name for tool in body.tools or []]
    if name not in known:
        raise InvalidRequestError.about(
            "tool_choice", f"the function {name!r} is not among the request's tools ({', '.join(known) or 'none'})")
    return ToolCalling(lambda: NamedToolCallParser(name), parallel, named=True)


class ToolCallStreams:
    """The tool-call streams of one streamed response, one per choice, each fed its choice's text so far."""

    def __init__(self, calling: ToolCalling) -> None:
        self._calling = calling
        self._streams: dict[int, ToolCallStream] = {}
        self._texts: dict[int, str] = {}

    def delta(self, index: int, text: str, finish_reason: Optional[str]) -> tuple[StreamDelta, Optional[str]]:
        """What choice `index`'s new `text` adds (content and tool-call pieces), and its finish reason."""
        so_far = self._texts[index] = self._texts.get(index, "") + text
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self._calling.stream()
        piece = stream.finish(so_far) if finish_reason is not None else stream.feed(so_far)
        return piece, self._calling.finish_reason(finish_reason, bool(stream.tool_calls))
