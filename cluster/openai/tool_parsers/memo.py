"""What a parse learned about a growing text, kept for the next parse of the same stream.

A stream parses the whole output again at every step; without memory that is quadratic in the length of a long
tool call. Facts kept here hold for every extension of the text they were learned on (a complete JSON value, a
point to resume an open one from), so the next parse of a longer text picks up where the last one stopped. A text
that does not extend the last one forgets everything.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any


class GrowingTextMemo:
    def __init__(self) -> None:
        self._text = ""
        self._facts: dict[Hashable, Any] = {}

    def sync(self, text: str) -> None:
        """Start a parse of `text`: keep what is known only if `text` extends the text parsed last."""
        if not text.startswith(self._text):
            self._facts.clear()
        self._text = text

    def get(self, key: Hashable) -> Any:
        return self._facts.get(key)

    def put(self, key: Hashable, fact: Any) -> None:
        self._facts[key] = fact
