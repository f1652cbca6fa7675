"""OpenAI-compatible request and response bodies for the HTTP server, and request -> `SamplingParams`.

Requests ignore unknown fields (OpenAI clients send extras) but check types strictly (no "0.5" -> 0.5).
Value ranges are checked once, by `SamplingParams`, when `to_sampling_params` is called; its failures come
out as `InvalidRequestError` (a `ValueError`) whose `param` names the offending request field.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from rayinfer.scheduler.sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """A request value the engine cannot use; `param` is the request field to blame (or None)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- requests


def _check_prompt(value: Any) -> Any:
    """Give one clear message for a bad `prompt` instead of one error per union member."""
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and len(v) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v
        )

    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or is_ids(value) or all(is_ids(v) for v in value):
            return value
    raise ValueError(
        "Input should be a string, a non-empty list of strings, a list of token ids, or a list of token-id lists"
    )


Prompt = Annotated[Union[str, list[str], list[int], list[list[int]]], BeforeValidator(_check_prompt)]


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One chat turn; `content` is a string or a list of text parts (no images)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class _SamplingFields(_Request):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extra body fields."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Any:
        if value is not None and info.data.get("stream") is False:
            raise ValueError("stream_options can only be set when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _build(self, max_tokens: int, max_tokens_field: str, renames: dict[str, str], **extra: Any) -> SamplingParams:
        optional = {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                         "repetition_penalty")
            if getattr(self, name) is not None
        }
        try:
            return SamplingParams(
                n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output, **optional, **extra,
            )
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            param = {"max_tokens": max_tokens_field, **renames}.get(field, field)
            message = str(exc) if param == field else f"{param}: {exc}"
            raise InvalidRequestError(message, param=param if param in type(self).model_fields else None) from exc

    def _max_tokens(
        self, requested: Optional[int], field: str, default_max_tokens: int, explicit: bool, prompt_field: str
    ) -> int:
        if default_max_tokens < 1:
            raise InvalidRequestError(
                f"{prompt_field} is too long: it fills the model's context and leaves no room for new tokens",
                param=prompt_field,
            )
        if requested is None:
            return default_max_tokens
        if requested > default_max_tokens:
            if not explicit:  # the implicit default (16) shrinks to fit the context
                return default_max_tokens
            raise InvalidRequestError(
                f"{field} must be <= {default_max_tokens}, the room left in the context after the prompt "
                f"(got {requested})",
                param=field,
            )
        return requested


class CompletionRequest(_SamplingFields):
    """Body of `POST /v1/completions`."""

    prompt: Prompt
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a batch: each item is a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine sampling settings; `default_max_tokens` is max_model_len - prompt_len."""
        max_tokens = self._max_tokens(
            self.max_tokens, "max_tokens", default_max_tokens, explicit="max_tokens" in self.model_fields_set,
            prompt_field="prompt",
        )
        return self._build(max_tokens, "max_tokens", {}, logprobs=self.logprobs, best_of=self.best_of)


class ChatCompletionRequest(_SamplingFields):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine sampling settings; `max_completion_tokens` wins over the older `max_tokens`."""
        if self.max_completion_tokens is not None:
            field, requested = "max_completion_tokens", self.max_completion_tokens
        else:
            field, requested = "max_tokens", self.max_tokens
        max_tokens = self._max_tokens(requested, field, default_max_tokens, explicit=True, prompt_field="messages")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._build(max_tokens, field, {"logprobs": "top_logprobs"}, logprobs=logprobs)


class TokenizeRequest(_Request):
    """Body of `POST /tokenize` (vLLM): exactly one of `prompt` or `messages`."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None  # None: True for a prompt, False for messages (template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages must be given")
        return self

    @property
    def use_special_tokens(self) -> bool:
        """The effective `add_special_tokens`."""
        return self.add_special_tokens if self.add_special_tokens is not None else self.prompt is not None


class DetokenizeRequest(_Request):
    """Body of `POST /detokenize` (vLLM)."""

    model: Optional[str] = None
    tokens: list[int]


# --------------------------------------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


def random_id(prefix: str) -> str:
    """An OpenAI-style id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Response):
    """One SSE chunk of a streamed completion; `usage` is set only on the final usage chunk."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    """A streamed message delta; unset keys are left out (`{}` on the closing chunk)."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionStreamResponse(_Response):
    """One SSE chunk of a streamed chat completion; the usage chunk has `choices=[]` and `usage` set."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "rayinfer"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(_Response):
    prompt: str


def sse_event(chunk: BaseModel) -> str:
    """One server-sent event line for a stream chunk; end the stream with `SSE_DONE`."""
    return f"data: {chunk.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ errors


class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Union[int, str, None] = None


class ErrorResponse(_Response):
    error: ErrorInfo


def error_body(message: str, type_: str, param: Optional[str] = None, code: Union[int, str, None] = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, e.g. type_ "invalid_request_error", code 400."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


_FIELD_SEGMENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field_path(loc: tuple) -> str:
    """Dotted path of an error location without pydantic's union tags (`list[int]`, `TextContentPart`)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (_FIELD_SEGMENT.match(str(p)) and p not in _UNION_TAGS)]
    if parts and parts[0] in ("body", "query"):  # FastAPI's RequestValidationError locations
        parts = parts[1:]
    return ".".join(parts)


def validation_error_body(exc: ValidationError) -> dict:
    """A 400 error body naming each bad field once; `param` is the first field's dotted path.

    Also accepts FastAPI's `RequestValidationError` (anything with `.errors()`).
    """
    seen: dict[str, str] = {}
    for err in exc.errors():
        path = _field_path(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        seen.setdefault(path, msg)
    # A union member that failed near the top ("content is not a str") hides nothing the deeper one doesn't say.
    seen = {p: m for p, m in seen.items() if not p or not any(q.startswith(p + ".") for q in seen)}
    items = [f"{path}: {msg}" if path else msg for path, msg in seen.items()]
    first = next(iter(seen), "")
    return error_body("Invalid request: " + "; ".join(items), "invalid_request_error", param=first or None, code=400)


__all__ = [
    "ChatCompletionChoice", "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse", "ChatMessage", "ChatResponseMessage", "CompletionChoice", "CompletionRequest",
    "CompletionResponse", "CompletionStreamResponse", "DeltaMessage", "DetokenizeRequest", "DetokenizeResponse",
    "ErrorInfo", "ErrorResponse", "InvalidRequestError", "ModelCard", "ModelList", "SSE_DONE", "StreamOptions",
    "TextContentPart", "TokenizeRequest", "TokenizeResponse", "UsageInfo", "error_body", "random_id", "sse_event",
    "validation_error_body",
]
