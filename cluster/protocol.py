"""OpenAI-compatible request and response bodies for the HTTP server, and request -> `SamplingParams`.

Requests ignore unknown fields (OpenAI clients send extras) but check types strictly (no "0.5" -> 0.5).
Value ranges are checked once, by `SamplingParams`, when `to_sampling_params` is called; its failures come
out as `InvalidRequestError` (a `ValueError`) whose `param` names the offending request field. What the engine
refuses when a request is added (`logprobs` over its `max_logprobs`, token ids outside the vocabulary) is renamed
to the request's field by `engine_refusal`.

`use_beam_search` (vLLM's older extra field) turns a request into a beam search instead: `to_beam_search_params`
gives its `BeamSearchParams` (beam width `best_of` if given, else `n`; `length_penalty`, `ignore_eos`) and refuses
the sampling fields a beam search would silently ignore.

`completion_logprobs` and `chat_logprobs` turn the engine's per-token logprobs into the two OpenAI formats.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
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

from rayinfer.scheduler.sampling_params import GREEDY_TEMPERATURE_EPS, BeamSearchParams, SamplingParams


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


# Fields a beam search cannot honour (it ranks raw logprobs, one token per step): each with the test its value
# must pass to be accepted (unset or neutral).
NOT_WITH_BEAM_SEARCH: dict[str, Callable[[Any], bool]] = {
    "top_p": lambda v: v is None or v == 1,
    "top_k": lambda v: v is None or v in (0, -1),
    "min_p": lambda v: v is None or v == 0,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_tokens": lambda v: v == 0,
    "stop": lambda v: not v,
    "stop_token_ids": lambda v: not v,
    "logit_bias": lambda v: not v,
    "allowed_token_ids": lambda v: v is None,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: not v,
    "echo": lambda v: not v,
}


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
    # OpenAI sends logit_bias keys as strings ("50256"); SamplingParams turns them into token ids.
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    # vLLM's older beam search: the beam width is best_of if given, else n; the n best beams come back, best first.
    use_beam_search: bool = False
    length_penalty: float = 1.0

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
                include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=self.logit_bias,
                allowed_token_ids=self.allowed_token_ids, **optional, **extra,
            )
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0].split("[", 1)[0]  # "logit_bias[7] must be ..." -> logit_bias
            param = {"max_tokens": max_tokens_field, **renames}.get(field, field)
            message = str(exc) if param == field else f"{param}: {exc}"
            raise InvalidRequestError(message, param=param if param in type(self).model_fields else None) from exc

    def _engine_renames(self) -> dict[str, str]:
        """Engine field name -> this request's field, for `engine_refusal`."""
        return {}

    # ------------------------------------------------------------------ beam search
    @property
    def beam_width_field(self) -> str:
        """The field that sets a beam search's width: `best_of` if given, else `n` (as vLLM did)."""
        return "best_of" if getattr(self, "best_of", None) is not None else "n"

    def _requested_max_tokens(self) -> tuple[Optional[int], str, bool, str]:
        """(requested max tokens, its field, whether given explicitly, the prompt's field)."""
        raise NotImplementedError

    def to_beam_search_params(self, default_max_tokens: int) -> BeamSearchParams:
        """The beam search this `use_beam_search` request asks for; `default_max_tokens` is max_model_len -
        prompt_len. Its width is `best_of` if given, else `n`, and `n` beams are returned (so n <= best_of).

        Beam search ranks raw logprobs, so `temperature` must be 0 if given, and fields that change how tokens are
        drawn or cut (`top_p`, penalties, `stop`, `logit_bias`, ...) or ask for logprobs are refused rather than
        ignored, each with a 400 naming it. `seed` is accepted and has no effect.
        """
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1 (got {self.n})", param="n")
        width_field = self.beam_width_field
        width = getattr(self, width_field)
        if width < 1:
            raise InvalidRequestError(f"{width_field} (the beam width) must be >= 1 (got {width})", param=width_field)
        if width < self.n:
            raise InvalidRequestError(
                f"best_of (the beam width) must be >= n, the beams returned (got best_of={width}, n={self.n})",
                param="best_of",
            )
        if self.temperature is not None and self.temperature >= GREEDY_TEMPERATURE_EPS:
            raise InvalidRequestError(
                f"temperature must be 0 (or unset) with use_beam_search, which ranks the model's raw logprobs "
                f"(got {self.temperature})",
                param="temperature",
            )
        model_fields = type(self).model_fields
        for name, accepted in NOT_WITH_BEAM_SEARCH.items():
            if name in model_fields and not accepted(getattr(self, name)):
                raise InvalidRequestError(f"{name} is not supported with use_beam_search", param=name)
        requested, field, explicit, prompt_field = self._requested_max_tokens()
        max_tokens = self._max_tokens(requested, field, default_max_tokens, explicit, prompt_field)
        try:
            return BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    length_penalty=self.length_penalty)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            param = {"beam_width": width_field, "max_tokens": field}.get(name, name)
            message = str(exc) if param == name else f"{param}: {exc}"
            raise InvalidRequestError(message, param=param if param in type(self).model_fields else None) from exc

    def engine_refusal(self, message: str) -> InvalidRequestError:
        """The engine's add-time refusal ("field: why"), renamed to this request's field: e.g. a chat request's
        `logprobs` over the engine's max_logprobs is its `top_logprobs`."""
        field, sep, why = message.partition(": ")
        if not sep or not _FIELD_SEGMENT.match(field):
            return InvalidRequestError(message)
        param = self._engine_renames().get(field, field)
        if param not in type(self).model_fields:
            return InvalidRequestError(message)
        return InvalidRequestError(f"{param}: {why}", param=param)

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
        """Engine sampling settings; `default_max_tokens` is max_model_len - prompt_len.

        With `echo` and `logprobs`, the prompt's logprobs are asked too (`prompt_logprobs`, as vLLM does).
        """
        if self.echo and self.max_tokens == 0:
            raise InvalidRequestError(
                "max_tokens: 0 with echo (return only the prompt) is not supported by this engine, which "
                "generates at least one token; use max_tokens >= 1",
                param="max_tokens",
            )
        max_tokens = self._max_tokens(
            self.max_tokens, "max_tokens", default_max_tokens, explicit="max_tokens" in self.model_fields_set,
            prompt_field="prompt",
        )
        prompt_logprobs = self.logprobs if self.echo else None
        return self._build(max_tokens, "max_tokens", {"prompt_logprobs": "logprobs"}, logprobs=self.logprobs,
                           prompt_logprobs=prompt_logprobs, best_of=self.best_of)

    def _requested_max_tokens(self) -> tuple[Optional[int], str, bool, str]:
        return self.max_tokens, "max_tokens", "max_tokens" in self.model_fields_set, "prompt"

    def _engine_renames(self) -> dict[str, str]:
        return {"prompt_logprobs": "logprobs", "prompt_token_ids": "prompt"}


class ChatCompletionRequest(_SamplingFields):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    best_of: Optional[int] = None  # a vLLM extra here, as on completions

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Any:
        # As OpenAI; 0 is harmless and accepted without logprobs, as vLLM does.
        if value and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs can only be set when logprobs is true")
        return value

    @property
    def _max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine sampling settings; `max_completion_tokens` wins over the older `max_tokens`."""
        if self.max_completion_tokens is not None:
            field, requested = "max_completion_tokens", self.max_completion_tokens
        else:
            field, requested = "max_tokens", self.max_tokens
        max_tokens = self._max_tokens(requested, field, default_max_tokens, explicit=True, prompt_field="messages")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._build(max_tokens, field, {"logprobs": "top_logprobs"}, logprobs=logprobs, best_of=self.best_of)

    def _requested_max_tokens(self) -> tuple[Optional[int], str, bool, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens", True, "messages"
        return self.max_tokens, "max_tokens", True, "messages"

    def _engine_renames(self) -> dict[str, str]:
        return {"logprobs": "top_logprobs", "prompt": "messages", "prompt_token_ids": "messages",
                "max_tokens": self._max_tokens_field}


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


class CompletionLogProbs(_Response):
    """The legacy completions `logprobs`: per token its text, logprob, alternatives (text -> logprob) and
    character offset; null entries for a token nothing predicts (the first prompt token, with echo)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
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


class ChatCompletionLogProb(_Response):
    token: str
    logprob: float = -9999.0
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(_Response):
    """A chat choice's `logprobs`: one entry per generated token, each with its `top_logprobs` alternatives."""

    content: Optional[list[ChatCompletionLogProbsContent]] = None


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
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
    logprobs: Optional[ChatCompletionLogProbs] = None
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


# ---------------------------------------------------------------------------------------------- logprobs

# JSON has no -inf: OpenAI (and vLLM) send this floor for a token the model rules out.
LOGPROB_FLOOR = -9999.0

# One position's candidates as the engine gives them: token id -> an object with `logprob`, `rank` (1-based,
# by raw logit) and `decoded_token` (`rayinfer.scheduler.outputs.Logprob`); the scored token comes first.
PositionLogprobs = Mapping[int, Any]


def _json_logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


def _token_text(token_id: int, logprob: Any, decode: Callable[[int], str]) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else decode(token_id)


def _position(positions: Optional[Sequence[Optional[PositionLogprobs]]], i: int) -> Optional[PositionLogprobs]:
    return positions[i] if positions is not None and i < len(positions) else None


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Optional[Sequence[Optional[PositionLogprobs]]],
    num_top: int,
    decode: Callable[[int], str],
    initial_offset: int = 0,
) -> CompletionLogProbs:
    """The legacy completions `logprobs` object for `token_ids`, as vLLM builds it.

    `positions[i]` holds token i's candidates (None where nothing predicts it: its entries are null).
    `top_logprobs[i]` maps text to logprob for the token itself and the `num_top` most likely ones (so
    `num_top` or `num_top + 1` entries); `text_offset` starts at `initial_offset` and adds each token's text
    length, so a stream's chunks continue one another. `decode(id)` names a token the engine gave no text for.
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for i, token_id in enumerate(token_ids):
        position = _position(positions, i)
        scored = position.get(token_id) if position is not None else None
        token = _token_text(token_id, scored, decode)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if scored is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_json_logprob(scored.logprob))
        top: dict[str, float] = {}
        for candidate_id, candidate in position.items():
            rank = getattr(candidate, "rank", None)
            if candidate_id == token_id or rank is None or rank <= num_top:
                top.setdefault(_token_text(candidate_id, candidate, decode), _json_logprob(candidate.logprob))
        out.top_logprobs.append(top)
    return out


def next_text_offset(logprobs: CompletionLogProbs, initial_offset: int) -> int:
    """Where the next stream chunk's `text_offset` starts after `logprobs`."""
    return initial_offset + sum(len(token) for token in logprobs.tokens)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(
    token_ids: Sequence[int],
    positions: Optional[Sequence[Optional[PositionLogprobs]]],
    top_logprobs: int,
    decode: Callable[[int], str],
) -> ChatCompletionLogProbs:
    """A chat choice's `logprobs` for `token_ids`: each token's text, logprob and UTF-8 bytes, and its
    `top_logprobs` list of the `top_logprobs` most likely tokens, by rank (as OpenAI: exactly that many)."""
    content = []
    for i, token_id in enumerate(token_ids):
        position = _position(positions, i)
        scored = position.get(token_id) if position is not None else None
        token = _token_text(token_id, scored, decode)
        if scored is None:
            content.append(ChatCompletionLogProbsContent(token=token, bytes=_token_bytes(token)))
            continue
        candidates = list(position.items())
        if all(getattr(c, "rank", None) is not None for _, c in candidates):
            candidates.sort(key=lambda item: item[1].rank)
        top = []
        for candidate_id, candidate in candidates[: max(top_logprobs, 0)]:
            text = _token_text(candidate_id, candidate, decode)
            top.append(ChatCompletionLogProb(token=text, logprob=_json_logprob(candidate.logprob),
                                             bytes=_token_bytes(text)))
        content.append(ChatCompletionLogProbsContent(
            token=token, logprob=_json_logprob(scored.logprob), bytes=_token_bytes(token), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)


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
    "ChatCompletionChoice", "ChatCompletionLogProb", "ChatCompletionLogProbs", "ChatCompletionLogProbsContent",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse", "ChatMessage", "ChatResponseMessage", "CompletionChoice", "CompletionLogProbs",
    "CompletionRequest", "CompletionResponse", "CompletionStreamResponse", "DeltaMessage", "DetokenizeRequest",
    "DetokenizeResponse", "ErrorInfo", "ErrorResponse", "InvalidRequestError", "LOGPROB_FLOOR", "ModelCard",
    "ModelList", "SSE_DONE", "StreamOptions", "TextContentPart", "TokenizeRequest", "TokenizeResponse", "UsageInfo",
    "chat_logprobs", "completion_logprobs", "error_body", "next_text_offset", "random_id", "sse_event",
    "validation_error_body",
]
