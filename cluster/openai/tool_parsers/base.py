"""What a tool-call parser gives (`ParsedText`), its interface, and the loop most formats share.

Most formats write content, then a block of tool-call markup, then maybe more content and more blocks.
`BlockToolCallParser` walks that: a format says where a block starts (`find_block`) and how far its calls go
(`scan_block`); the loop decides what is content. The same loop serves streaming and final parses, so that the
rules which keep successive parses monotone live in one place:

- a block still open (non-final) shows its calls so far, and the content stops before it;
- a broken block (or one still open at the final parse) is not tool calls: from just past its last complete call
  (or from the end of the previous block) the text is content. While streaming, if the broken block had already
  shown a call, the rest is held back instead: the final parse returns that call's text as content, and content
  sent before it would be out of order;
- whitespace between two blocks, or after the last one, is markup, not content.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from rayinfer.cluster.openai.tool_parsers.json_scan import Progress, skip_ws
from rayinfer.cluster.openai.tool_parsers.memo import GrowingTextMemo


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object; while streaming, the longest prefix of it known so far


@dataclass
class ParsedText:
    content: str  # the text outside the tool calls
    tool_calls: list[ToolCall]  # in the order the model wrote them


class ToolCallParser(ABC):
    """Reads one model output for tool calls. What `parse` gives depends on its arguments only; a parser may remember
    what it learned of the last text to parse a longer one faster, so a stream should have a parser of its own.

    With final=False (streaming) the content leaves out any tail that could still become a tool call, a call is
    listed once its name is complete, and successive parses of a growing text only append: to the content, to the
    list of calls, to each listed call's arguments. The final parse extends them, except that a call which turns out
    broken (its JSON cut short or malformed) is dropped and its text goes back into the content.
    """

    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str, final: bool = True) -> ParsedText: ...


@dataclass
class BlockScan:
    """How far one block of tool-call markup goes."""

    progress: Progress  # DONE: the block is complete; OPEN: it needs more text; BAD: it is not tool calls
    end: int  # DONE: where its markup ends; else where content resumes if it is broken: past its last complete call
    calls: list[ToolCall] = field(default_factory=list)  # its complete calls, then the one in progress once named
    complete: int = 0  # how many of `calls` are complete


class BlockToolCallParser(ToolCallParser):
    """A format of content and blocks of tool-call markup; see the module docstring for the rules."""

    def __init__(self) -> None:
        self.memo = GrowingTextMemo()  # what the last parse learned, for a stream's next parse to pick up

    @abstractmethod
    def find_block(self, text: str, pos: int, after_call: bool) -> Optional[tuple[int, int]]:
        """The next block at or after `pos` as (where its markup starts, where its calls start), or None."""

    @abstractmethod
    def scan_block(self, text: str, body: int, final: bool) -> BlockScan:
        """The block whose calls start at `body`. With final=True it is never OPEN: it is complete or broken."""

    def held_tail(self, tail: str, after_call: bool) -> int:
        """How many characters at the end of `tail` (text past the last block) may yet start a block."""
        return 0

    def parse(self, text: str, final: bool = True) -> ParsedText:
        self.memo.sync(text)
        content: list[str] = []
        calls: list[ToolCall] = []
        pos, after_call = 0, False
        while True:
            found = self.find_block(text, pos, after_call)
            if found is None:
                tail = text[pos:]
                if not final:
                    tail = tail[: len(tail) - self.held_tail(tail, after_call)]
                if not (after_call and not tail.strip()):
                    content.append(tail)
                break
            start, body = found
            between = text[pos:start]
            keep_between = not (after_call and not between.strip())
            block = self.scan_block(text, body, final)
            good = block.calls[: block.complete]
            still_calls = block.progress is Progress.DONE or (block.progress is Progress.OPEN and not final)
            # Broken after a call was listed: while streaming, hold the rest back until the final parse.
            held = not still_calls and not final and len(block.calls) > len(good)
            if (still_calls or good or held) and keep_between:
                content.append(between)
            if block.progress is Progress.DONE:
                calls.extend(block.calls)
                pos, after_call = block.end, True
                continue
            if still_calls or held:
                calls.extend(block.calls)
            else:
                calls.extend(good)
                content.append(text[block.end if good else pos:])
            break
        return ParsedText("".join(content), calls)


def cut_inside(text: str, i: int, marker: str) -> bool:
    """Whether the text from `i` is a start of `marker` that the end of the text cut short (true at the end, too)."""
    return len(text) - i < len(marker) and marker.startswith(text[i:])


def held_marker_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker` (it may yet become the marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class MarkedToolCallParser(BlockToolCallParser):
    """A format whose blocks start with a fixed marker, such as `<tool_call>` or `[TOOL_CALLS]`."""

    start_marker: ClassVar[str]

    def find_block(self, text: str, pos: int, after_call: bool) -> Optional[tuple[int, int]]:
        start = text.find(self.start_marker, pos)
        return None if start < 0 else (start, start + len(self.start_marker))

    def held_tail(self, tail: str, after_call: bool) -> int:
        return held_marker_prefix(tail, self.start_marker)


def block_start(text: str, body: int, final: bool) -> tuple[int, Optional[BlockScan]]:
    """Where a block's body begins past its whitespace, and the block's verdict when the text ends before it
    (broken if final, else open): (start, None) when there is something to scan."""
    j = skip_ws(text, body)
    if j >= len(text):
        return j, BlockScan(Progress.BAD if final else Progress.OPEN, body)
    return j, None


def close_with_marker(text: str, i: int, end_marker: str, final: bool, calls: list[ToolCall]) -> BlockScan:
    """A block whose `calls` are complete at `i` and which ends with `end_marker` after optional whitespace. A final
    output that stops before the marker (or inside it) still counts: generation may stop there."""
    j = skip_ws(text, i)
    if text.startswith(end_marker, j):
        return BlockScan(Progress.DONE, j + len(end_marker), calls, len(calls))
    if cut_inside(text, j, end_marker):
        if final:
            return BlockScan(Progress.DONE, len(text), calls, len(calls))
        return BlockScan(Progress.OPEN, i, calls, 0)
    return BlockScan(Progress.BAD, i, calls, 0)

