"""`StructuredOutputsParams`: what shape a request's output must take (vLLM's fields), checked when made and
lowered to the `GrammarSpec` every worker compiles and enforces while sampling.

Exactly one constraint is set: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the
output is one of these strings), `grammar` (EBNF, in xgrammar's dialect: GBNF with `root ::= ...`) or
`json_object=True` (any JSON object or array). A schema, regex or grammar that does not compile is refused
when the request is added, before anything runs, with xgrammar's reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.workers.grammar import GrammarError, GrammarSpec

FIELD = "structured_outputs"
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError.about(
                FIELD, f"set exactly one of {', '.join(_KINDS)} (got {', '.join(given) or 'none'})"
            )
        if self.json_object not in (None, True, False):
            raise InvalidRequestError.about(f"{FIELD}.json_object", f"must be true or false (got {self.json_object!r})")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError.about(f"{FIELD}.{kind}", f"must be a non-empty string (got {value!r:.80})")
        self._spec = self._lower()

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        return self._spec.kind

    def spec(self) -> GrammarSpec:
        """The constraint as the workers compile it."""
        return self._spec

    def _lower(self) -> GrammarSpec:
        try:
            if self.json is not None:
                return GrammarSpec.json_schema(self.json)
            if self.choice is not None:
                if not isinstance(self.choice, (list, tuple)):
                    raise GrammarError("choice", f"choice must be a list of strings (got {type(self.choice).__name__})")
                return GrammarSpec.choices(list(self.choice))
            if self.regex is not None:
                return GrammarSpec("regex", self.regex)
            if self.grammar is not None:
                return GrammarSpec("grammar", self.grammar)
            return GrammarSpec("json_object")
        except GrammarError as exc:
            raise InvalidRequestError.about(f"{FIELD}.{exc.kind}", str(exc)) from None
        except (TypeError, ValueError) as exc:  # json.dumps of a schema holding something that is not JSON
            raise InvalidRequestError.about(f"{FIELD}.json", f"the JSON schema is not JSON: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredOutputsParams) and self._spec == other._spec

    def __hash__(self) -> int:
        return hash(self._spec)

    def __repr__(self) -> str:
        return f"StructuredOutputsParams({self._spec.kind}={self._spec.source[:200]!r})"


__all__ = ["StructuredOutputsParams"]
