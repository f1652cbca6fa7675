"""A scanner over JSON text that may be cut short: where a value ends, whether it can still be completed, or
where it went wrong.

Tool-call parsers stream a call's arguments as the raw text the model wrote, so on a prefix of the output they need
to know how far a JSON value reaches without parsing it into objects. The scanner is as strict as `json.loads`
(no NaN, no raw control characters in strings, no leading zeros), so a value it calls complete also loads, and one
it calls bad can never be completed. Strings and numbers are matched with regular expressions, so a scan costs a
step per JSON token rather than per character.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from rayinfer.cluster.openai.tool_parsers.memo import GrowingTextMemo


class Progress(Enum):
    DONE = "done"  # complete; `end` is just past it
    OPEN = "open"  # the text ran out inside something that can still be completed
    BAD = "bad"  # no continuation makes it valid; `end` is the first character that cannot belong


@dataclass(frozen=True)
class Scan:
    progress: Progress
    end: int


_WS = re.compile(r"[ \t\n\r]*")
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_ESCAPE_PREFIX = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# The longest start of the text that some number could still begin with ("-", "1.", "2e+" are such starts).
_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]*)?|\.|[eE][+-]?[0-9]*)?)?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_CLOSER = {"{": "}", "[": "]"}


def skip_ws(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after `i` (len(text) if none)."""
    return _WS.match(text, i).end()


def scan_string(text: str, i: int) -> Scan:
    """The JSON string whose opening quote is text[i]."""
    j = _STRING_BODY.match(text, i + 1).end()
    if j < len(text) and text[j] == '"':
        return Scan(Progress.DONE, j + 1)
    escape = _ESCAPE_PREFIX.match(text, j)  # a backslash escape cut short by the end of the text is still open
    stop = escape.end() if escape else j
    return Scan(Progress.OPEN if stop == len(text) else Progress.BAD, stop)


def _scan_number(text: str, i: int) -> Scan:
    stop = _NUMBER_PREFIX.match(text, i).end()
    if stop == len(text):
        return Scan(Progress.OPEN, stop)
    # What follows the number is its container's business; the number itself must be whole by now.
    return Scan(Progress.DONE if _NUMBER.fullmatch(text, i, stop) else Progress.BAD, stop)


def _scan_literal(text: str, i: int) -> Scan:
    word = _LITERALS[text[i]]
    k = 0
    while k < len(word) and i + k < len(text) and text[i + k] == word[k]:
        k += 1
    if k == len(word):
        return Scan(Progress.DONE, i + k)
    return Scan(Progress.OPEN if i + k == len(text) else Progress.BAD, i + k)


def _scan_scalar(text: str, i: int) -> Scan:
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c == "-" or "0" <= c <= "9":
        return _scan_number(text, i)
    if c in _LITERALS:
        return _scan_literal(text, i)
    return Scan(Progress.BAD, i)


@dataclass(frozen=True)
class _Resume:
    """Where an open scan of a value stopped: the start of the token that ran out, with the brackets around it."""

    i: int
    closers: tuple[str, ...]
    state: str


def scan_value(text: str, i: int, memo: Optional[GrowingTextMemo] = None) -> Scan:
    """The JSON value that starts at or after text[i] (after whitespace). A number that reaches the end of the text
    is OPEN, since more digits may follow. With a `memo` (synced to `text`), a scan of a text that grew since the
    last one resumes where that one ran out."""
    key = ("json_value", i)
    known = memo.get(key) if memo is not None else None
    if isinstance(known, Scan):
        return known
    if isinstance(known, _Resume):
        scan, resume = _scan_from(text, known.i, list(known.closers), known.state)
    else:
        scan, resume = _scan_from(text, i, [], "value")
    if memo is not None:
        memo.put(key, scan if resume is None else resume)
    return scan


def _scan_from(text: str, i: int, closers: list[str], state: str) -> tuple[Scan, Optional[_Resume]]:
    """`scan_value` from a point inside the value; when OPEN, also where to resume. `closers` are the brackets
    still open, innermost last; `state` is what may come next: value | first_value (just after "[") | key |
    first_key (just after "{") | colon | next (after a member: a comma or the closing bracket)."""
    n = len(text)
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return Scan(Progress.OPEN, n), _Resume(i, tuple(closers), state)
        c = text[i]
        closing = (state == "first_value" and c == "]") or (state == "first_key" and c == "}") or (
            state == "next" and c == closers[-1])
        if closing:
            closers.pop()
            i += 1
            if not closers:
                return Scan(Progress.DONE, i), None
            state = "next"
        elif state in ("value", "first_value"):
            if c in _CLOSER:
                closers.append(_CLOSER[c])
                state = "first_key" if c == "{" else "first_value"
                i += 1
                continue
            scan = _scan_scalar(text, i)
            if scan.progress is Progress.OPEN:
                return scan, _Resume(i, tuple(closers), state)
            if scan.progress is Progress.BAD or not closers:
                return scan, None
            i, state = scan.end, "next"
        elif state in ("key", "first_key"):
            if c != '"':
                return Scan(Progress.BAD, i), None
            scan = scan_string(text, i)
            if scan.progress is Progress.OPEN:
                return scan, _Resume(i, tuple(closers), state)
            if scan.progress is Progress.BAD:
                return scan, None
            i, state = scan.end, "colon"
        elif state == "colon":
            if c != ":":
                return Scan(Progress.BAD, i), None
            i, state = i + 1, "value"
        else:
            if c != ",":
                return Scan(Progress.BAD, i), None
            i, state = i + 1, ("key" if closers[-1] == "}" else "value")
