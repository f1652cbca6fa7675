"""Incremental detokenization: output token ids to text, one token at a time, at a cost independent of length."""

from __future__ import annotations

import weakref
from typing import Any

# Prompt tokens decoded ahead of the first output token so it gets its context (leading spaces etc.).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character spans at most 4 tokens, so a longer pending run still ending in U+FFFD holds invalid bytes
# (a random model) or characters chained across token boundaries (BPE merges inside CJK runs). Past this many
# pending tokens we look for a boundary to emit up to, so garbage cannot grow the window (and the cost) forever.
_MAX_PENDING_TOKENS = 8
_CUT_SEARCH_TOKENS = 4


class IncrementalDetokenizer:
    """Turns output token ids into text one token at a time, never emitting half a UTF-8 character.

    Keeps a small window of ids: `[0, read)` was already emitted and only provides context, `[read, end)` is
    pending. Each step decodes the window and emits what goes past the context text, unless the text ends in
    U+FFFD (a multi-byte character still waiting for its last bytes); then the token stays pending. A long
    pending run is emitted up to a boundary no character straddles, so invalid bytes cannot grow the window.
    When skipping special tokens, they never enter the window: the tokenizer drops them before decoding anyway.

    `final_text()` is the streamed text plus whatever is still pending, so streaming and non-streaming clients
    see the same text. For byte-level BPE tokenizers it equals `tokenizer.decode(output_ids)` exactly; for
    decoders that strip a leading space at the start of a decode (SentencePiece "▁"), the first output token
    keeps the space it has in context, as the prompt + output text reads.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Fast tokenizers decode special tokens without extra spaces; accepted for API compatibility only.
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._special_ids: frozenset[int] = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self.output_ids: list[int] = []
        self._text = ""
        self._window: list[int] = []
        self._read = 0
        self._context_len = 0  # len(decode(window[:read]))
        context = [t for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:] if t not in self._special_ids]
        if context:
            text = self._decode(context)
            # A prompt cut inside a character would make the first output token's text depend on prompt bytes.
            if not text.endswith(_REPLACEMENT_CHAR):
                self._window, self._read, self._context_len = context, len(context), len(text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str:
        """Adds one output token; returns the newly completed text ("" while a character is incomplete)."""
        self.output_ids.append(token_id)
        if token_id in self._special_ids:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if not text.endswith(_REPLACEMENT_CHAR):
            return self._emit_up_to(len(self._window), text) if len(text) > self._context_len else ""
        if len(self._window) - self._read >= _MAX_PENDING_TOKENS:
            cut = self._find_clean_cut(text)
            if cut is not None:
                return self._emit_up_to(cut, self._decode(self._window[:cut]))
        return ""

    def _emit_up_to(self, cut: int, text: str) -> str:
        """Emits `text` (the decode of window[:cut]) past the context, then slides the window forward."""
        new_text = text[self._context_len :]
        # What was pending becomes the next context, so the window stays a few tokens long.
        start = self._read
        self._window = self._window[start:]
        self._read = cut - start
        self._context_len = len(self._decode(self._window[: self._read]))
        self._text += new_text
        return new_text

    def _find_clean_cut(self, text: str) -> int | None:
        """A pending boundary no character straddles: decoding both sides apart gives the same text."""
        end = len(self._window)
        for cut in range(end - 1, max(self._read, end - 1 - _CUT_SEARCH_TOKENS), -1):
            left = self._decode(self._window[:cut])
            if len(left) > self._context_len and left + self._decode(self._window[cut:]) == text:
                return cut
        return None

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return self._text

    def final_text(self) -> str:
        """The emitted text plus the pending tail (e.g. a character whose last bytes never came)."""
        tail = ""
        if self._read < len(self._window):
            tail = self._decode(self._window)[self._context_len :]
        return self.output_text + tail


# Per tokenizer object: building the set walks every added token, which takes ~0.2 s for a 32k-entry table.
_special_ids_cache: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids the tokenizer drops on decode(skip_special_tokens=True): special added tokens and named specials."""
    try:
        return _special_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    result = frozenset(ids)
    try:
        _special_ids_cache[tokenizer] = result
    except TypeError:  # not weak-referenceable: no caching
        pass
    return result
