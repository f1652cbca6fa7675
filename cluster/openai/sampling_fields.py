"""What a completions or chat request asks of the engine: its `SamplingParams` (with the output's constraint,
`structured_fields`), or its `BeamSearchParams` for `use_beam_search`, and which of its fields to blame for a
refusal.

Value ranges are `SamplingParams`' to check; its refusals, and the engine's when a request is added, carry the
engine's field name (`InvalidRequestError.field`), which `blame` renames to the one the client sent: a chat
request's `logprobs` is its `top_logprobs`, a completion's `prompt_logprobs` its `logprobs`.

The routes resolve `max_tokens` against the room the prompt leaves in the context (`room`, max_model_len -
prompt length): a completion's implicit 16 shrinks to fit, an explicit value that does not fit is refused, and
an unset one takes the whole room. Whether the prompt itself fits is the engine's to say.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from rayinfer.cluster.openai.request_models import ChatCompletionRequest, CompletionRequest, SamplingRequest
from rayinfer.cluster.openai.structured_fields import constraint_field, constraint_renames, structured_outputs_of
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import GREEDY_TEMPERATURE_EPS, BeamSearchParams, SamplingParams

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

_OPTIONAL = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty")


def max_tokens_field(body: SamplingRequest) -> str:
    """The field that caps the output: chat's `max_completion_tokens` wins over its older `max_tokens`."""
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def beam_width_field(body: SamplingRequest) -> str:
    """The field that sets a beam search's width: `best_of` if given, else `n` (as vLLM did)."""
    return "best_of" if body.best_of is not None else "n"


def field_renames(body: SamplingRequest) -> dict[str, str]:
    """Engine field name -> the field of this request it came from."""
    renames = {"max_tokens": max_tokens_field(body)}
    if isinstance(body, ChatCompletionRequest):
        renames.update(logprobs="top_logprobs", prompt="messages", prompt_token_ids="messages")
    else:
        renames.update(prompt_logprobs="logprobs", prompt_token_ids="prompt")
    renames.update(constraint_renames(body))
    return renames


def blame(
    body: SamplingRequest, error: InvalidRequestError, renames: Optional[Mapping[str, str]] = None
) -> InvalidRequestError:
    """`error` blaming the request's own field for the engine's (`renames` first, then `field_renames`); a field
    the request does not have (the engine's `request_id`, say) is named by none. A dotted name
    (`structured_outputs.regex`) is kept when its first part is the request's."""
    field = error.field
    if field is not None:
        field = (renames or {}).get(field) or field_renames(body).get(field, field)
    if field is None or field.split(".")[0] not in type(body).model_fields:
        return InvalidRequestError(str(error), None, error.reason)
    return error.renamed(field)


def resolve_max_tokens(body: SamplingRequest, room: int) -> Optional[int]:
    """The output cap to ask for, given the `room` the prompt leaves in the context (see the module's notes)."""
    field = max_tokens_field(body)
    requested = getattr(body, field)
    if room < 1:  # the prompt fills the context: the engine refuses it, naming the prompt
        return requested
    if requested is None:
        return room
    if requested > room:
        if isinstance(body, CompletionRequest) and "max_tokens" not in body.model_fields_set:
            return room  # the implicit default (16) shrinks to fit the context
        raise InvalidRequestError(
            f"{field} must be <= {room}, the room left in the context after the prompt (got {requested})", field
        )
    return requested


def to_sampling_params(body: SamplingRequest, room: int) -> SamplingParams:
    """The engine's sampling settings for `body`; `room` is max_model_len - prompt length. A completion with `echo`
    and `logprobs` asks for the prompt's logprobs too (`prompt_logprobs`, as vLLM does)."""
    if isinstance(body, ChatCompletionRequest):
        logprobs = {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
    else:
        if body.echo and body.max_tokens == 0:
            raise InvalidRequestError(
                "max_tokens: 0 with echo (return only the prompt) is not supported by this engine, which "
                "generates at least one token; use max_tokens >= 1",
                "max_tokens",
            )
        logprobs = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}
    optional = {name: getattr(body, name) for name in _OPTIONAL if getattr(body, name) is not None}
    try:
        return SamplingParams(
            n=body.n, best_of=body.best_of, seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, max_tokens=resolve_max_tokens(body, room), min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
            logit_bias=body.logit_bias, allowed_token_ids=body.allowed_token_ids,
            structured_outputs=structured_outputs_of(body), **optional, **logprobs,
        )
    except InvalidRequestError as exc:
        raise blame(body, exc) from exc


def to_beam_search_params(body: SamplingRequest, room: int) -> BeamSearchParams:
    """The beam search a `use_beam_search` request asks for; `room` is max_model_len - prompt length. Its width is
    `best_of` if given, else `n`, and `n` beams are returned (so n <= best_of).

    Beam search ranks raw logprobs, so `temperature` must be 0 if given, and fields that change how tokens are
    drawn or cut (`top_p`, penalties, `stop`, `logit_bias`, ...) or ask for logprobs are refused rather than
    ignored, each naming itself. `seed` is accepted and has no effect.
    """
    if body.n < 1:
        raise InvalidRequestError(f"n must be >= 1 (got {body.n})", "n")
    width_field = beam_width_field(body)
    width = getattr(body, width_field)
    if width < 1:
        raise InvalidRequestError(f"{width_field} (the beam width) must be >= 1 (got {width})", width_field)
    if width < body.n:
        raise InvalidRequestError(
            f"best_of (the beam width) must be >= n, the beams returned (got best_of={width}, n={body.n})", "best_of"
        )
    if body.temperature is not None and body.temperature >= GREEDY_TEMPERATURE_EPS:
        raise InvalidRequestError(
            f"temperature must be 0 (or unset) with use_beam_search, which ranks the model's raw logprobs "
            f"(got {body.temperature})",
            "temperature",
        )
    model_fields = type(body).model_fields
    for name, accepted in NOT_WITH_BEAM_SEARCH.items():
        if name in model_fields and not accepted(getattr(body, name)):
            raise InvalidRequestError(f"{name} is not supported with use_beam_search", name)
    # A beam search ranks raw logprobs and parses nothing: no constrained output, no tool calls.
    constrained = constraint_field(body)
    if constrained is not None:
        raise InvalidRequestError(f"{constrained} (a structured output) is not supported with use_beam_search",
                                  constrained)
    if isinstance(body, ChatCompletionRequest) and body.effective_tool_choice != "none":
        field = "tool_choice" if body.tool_choice is not None else "tools"
        raise InvalidRequestError(f"{field}: tool calling is not supported with use_beam_search (tool_choice "
                                  f"'none' leaves the tools in the prompt only)", field)
    max_tokens = resolve_max_tokens(body, room)
    try:
        # A prompt that fills the context has no cap to give: its first step is refused by the engine.
        return BeamSearchParams(beam_width=width, max_tokens=1 if max_tokens is None else max_tokens,
                                ignore_eos=body.ignore_eos, length_penalty=body.length_penalty)
    except InvalidRequestError as exc:
        raise blame(body, exc, {"beam_width": width_field}) from exc
