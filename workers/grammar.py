"""Grammars for constrained decoding, compiled with xgrammar: what a structured-output request asks for
(`GrammarSpec`, plain data that travels to every rank) and a per-tokenizer compile cache.

JSON schemas compile without free whitespace between tokens (`any_whitespace=False`): a model that is unsure (or
random, at temperature 1) would otherwise fill the output with blanks, which the schema allows but never ends.
They compile through xgrammar's EBNF with one repair: xgrammar lets a length-bounded string hold raw control
characters (U+0000-U+001F but CR and LF), which RFC 8259 (and Python's `json.loads`) refuse unescaped.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]
# How long a request waits for its grammar to compile before it is refused (the compile goes on, and is cached).
COMPILE_TIMEOUT_S = 60.0


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled; `kind` says which field it came from."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint: `source` is the JSON schema (as compact JSON text, keys in the given order), the regex, the choices (a JSON list),
    the EBNF grammar, or empty for any JSON object."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GrammarSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError("json", f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("json", f"a JSON schema is an object (got {type(schema).__name__})")
        # Compact but not key-sorted: the output's properties follow the schema's order.
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choices(cls, options: list[str]) -> GrammarSpec:
        if not options or not all(isinstance(option, str) and option for option in options):
            raise GrammarError("choice", "choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)))


def choice_ebnf(options: list[str]) -> str:
    """A grammar of exactly one of `options`, each a string literal. (Not a regex: xgrammar's regex reader does not
    know every escape Python's `re.escape` writes, and warns on each.) JSON's string escapes are EBNF's."""
    return "root ::= " + " | ".join(json.dumps(option, ensure_ascii=False) for option in options)


# The character class xgrammar gives a length-bounded JSON string, and the one RFC 8259 allows unescaped.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def json_schema_ebnf(xgrammar: Any, schema: str) -> str:
    """The EBNF grammar of `schema`'s compact JSON, with strings that hold no raw control characters."""
    ebnf = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer, caching the most recently used by spec, failures included (they
    are as costly to find), within `max_cached` entries and `max_cached_bytes` of compiled grammars (a schema's
    token-mask cache grows with the vocabulary). xgrammar's own cache is off: this one covers every kind."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int] | None = None, max_threads: int = 2,
        max_cached: int = 128, max_cached_bytes: int = 512 << 20,
    ) -> None:
        import xgrammar

        self._xgr = xgrammar
        # vocab_size: the model's, which may exceed the tokenizer's (padded embeddings); those ids are never allowed.
        # stop_token_ids: the ids that end a sequence on this engine; the end of a grammar allows only them.
        stops = sorted(set(stop_token_ids)) if stop_token_ids is not None else None
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None
        )
        self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._compiled: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._max_cached = max_cached
        self._max_cached_bytes = max_cached_bytes
        self._cached_bytes = 0
        self._lock = threading.Lock()  # compiles may run on a worker thread beside the step loop

    def compile(self, spec: GrammarSpec) -> Any:
        """The `xgrammar.CompiledGrammar` for `spec`; raises `GrammarError` saying what is wrong with it."""
        with self._lock:
            cached = self._compiled.get(spec)
            if cached is not None:
                self._compiled.move_to_end(spec)
        if cached is None:
            try:
                cached = self._compile(spec)
            except GrammarError as exc:
                cached = exc
            except Exception as exc:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError/ValueError
                cached = GrammarError(spec.kind, f"{_describe(spec.kind)} cannot be compiled: {_first_line(exc)}")
            with self._lock:
                if spec not in self._compiled:
                    self._compiled[spec] = cached
                    self._cached_bytes += _size(cached)
                while len(self._compiled) > 1 and (len(self._compiled) > self._max_cached
                                                   or self._cached_bytes > self._max_cached_bytes):
                    self._cached_bytes -= _size(self._compiled.popitem(last=False)[1])
        if isinstance(cached, GrammarError):
            raise cached
        return cached

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._compiler
        if spec.kind == "json":
            return compiler.compile_grammar(json_schema_ebnf(self._xgr, spec.source))
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_ebnf(json.loads(spec.source)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        raise GrammarError(spec.kind, f"unknown structured output kind {spec.kind!r}")

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh `xgrammar.GrammarMatcher` for `spec` (one per sequence: it advances with each accepted token)."""
        return self._xgr.GrammarMatcher(self.compile(spec))


def _size(entry: Any) -> int:
    return 0 if isinstance(entry, GrammarError) else int(entry.memory_size_bytes)


def _describe(kind: str) -> str:
    return {"json": "the JSON schema", "regex": "the regex", "grammar": "the grammar", "choice": "the choices",
            "json_object": "the JSON grammar"}.get(kind, kind)


# xgrammar prefixes its messages with a time and its C++ source location: "[19:56:56] /project/cpp/x.cc:94: ".
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _LOCATION.sub("", text.splitlines()[0])[:500]
