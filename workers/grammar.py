"""Grammars for constrained decoding, compiled with xgrammar: what a structured-output request asks for
(`GrammarSpec`, plain data that travels to every rank) and a per-tokenizer compile cache.

JSON schemas compile without free whitespace between tokens (`any_whitespace=False`): a model that is unsure (or
random, at temperature 1) would otherwise fill the output with blanks, which the schema allows but never ends.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled; `kind` says which field it came from."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint: `source` is the JSON schema (as canonical JSON text), the regex, the choices (a JSON list),
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
        return cls("json", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def choices(cls, options: list[str]) -> GrammarSpec:
        if not options or not all(isinstance(option, str) and option for option in options):
            raise GrammarError("choice", "choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)))


def choice_regex(options: list[str]) -> str:
    """A regex that matches exactly one of `options` (each taken literally)."""
    return "(" + "|".join(re.escape(option) for option in options) + ")"


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer, caching each by its spec (xgrammar caches schema compilation
    too; this cache also keeps regexes, choices and grammars, and the failures, which are as costly to find)."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_threads: int = 2) -> None:
        import xgrammar

        self._xgr = xgrammar
        # vocab_size: the model's, which may exceed the tokenizer's (padded embeddings); those ids are never allowed.
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._compiled: dict[GrammarSpec, Any] = {}
        self._lock = threading.Lock()  # compiles may run on a worker thread beside the step loop

    def compile(self, spec: GrammarSpec) -> Any:
        """The `xgrammar.CompiledGrammar` for `spec`; raises `GrammarError` saying what is wrong with it."""
        with self._lock:
            cached = self._compiled.get(spec)
        if cached is None:
            try:
                cached = self._compile(spec)
            except GrammarError as exc:
                cached = exc
            except Exception as exc:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError/ValueError
                cached = GrammarError(spec.kind, f"{_describe(spec.kind)} cannot be compiled: {_first_line(exc)}")
            with self._lock:
                self._compiled[spec] = cached
        if isinstance(cached, GrammarError):
            raise cached
        return cached

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._compiler
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.source, any_whitespace=False)
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_regex(choice_regex(json.loads(spec.source)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        raise GrammarError(spec.kind, f"unknown structured output kind {spec.kind!r}")

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh `xgrammar.GrammarMatcher` for `spec` (one per sequence: it advances with each accepted token)."""
        return self._xgr.GrammarMatcher(self.compile(spec))


def _describe(kind: str) -> str:
    return {"json": "the JSON schema", "regex": "the regex", "grammar": "the grammar", "choice": "the choices",
            "json_object": "the JSON grammar"}.get(kind, kind)


# xgrammar prefixes its messages with a time and its C++ source location: "[19:56:56] /project/cpp/x.cc:94: ".
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _LOCATION.sub("", text.splitlines()[0])[:500]
