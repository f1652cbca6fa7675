"""The error a request that can never run is refused with, carrying the field to blame as data.

Raised where the rule lives (`SamplingParams` for a value's range, the engine for limits such as the context
length or `max_logprobs`) and read, unchanged, by the HTTP front door, which renames the field to the one the
client sent (a chat request's `logprobs` is its `top_logprobs`): no layer parses a message to find the field.
It pickles with its field, so it survives Ray's task errors.
"""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """`field`: the request parameter to blame (None: the request as a whole); `reason`: why, without the field's
    name, when the message is `"{field}: {reason}"`."""

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason

    @classmethod
    def about(cls, field: str, reason: str) -> InvalidRequestError:
        """`"{field}: {reason}"`, the form the engine's refusals take."""
        return cls(f"{field}: {reason}", field, reason)

    def renamed(self, field: str | None) -> InvalidRequestError:
        """The same refusal blaming `field` instead (the name the client used for this parameter)."""
        if field == self.field or field is None:
            return self
        return InvalidRequestError(f"{field}: {self.reason or self}", field, self.reason or str(self))

    def __reduce__(self):
        return type(self), (str(self), self.field, self.reason)
