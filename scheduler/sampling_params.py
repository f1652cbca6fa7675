"""How a request wants its tokens drawn: `SamplingParams` (vLLM's fields and defaults) and `BeamSearchParams`.

Both are plain dataclasses checked once in `__post_init__`, so a bad value fails when the request is made,
with a message naming the field, instead of deep inside a worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.structured_outputs import StructuredOutputsParams
from rayinfer.workers.sampling_options import SamplingOptions

# Temperatures below this are treated as greedy decoding (argmax).
GREEDY_TEMPERATURE_EPS = 1e-5
# logit_bias values are clamped to [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT], the range OpenAI's API documents.
LOGIT_BIAS_LIMIT = 100.0


def _check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer{' or None' if allow_none else ''} (got {value!r})", name)
    if minimum is not None and value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum} (got {value})", name)


def _field_of(name: str) -> str:
    """The parameter a checked value belongs to: `logit_bias[7]` is part of `logit_bias`."""
    return name.split("[", 1)[0]


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(f"{name} must be a number (got {value!r})", _field_of(name))
    return float(value)


@dataclass
class SamplingParams:
    """Per-request sampling settings; `stop`, `stop_token_ids`, `top_k` and `logit_bias` are normalised on creation.

    `logprobs=k` returns, for each generated token, the top k candidates plus the drawn token (k or k + 1
    entries); `prompt_logprobs=k` the same for each prompt token after the first. As in vLLM, these are the
    log_softmax of the model's raw logits: before `logit_bias`, `allowed_token_ids`, penalties, temperature and
    top-k/top-p/min-p, so they do not depend on how the token was drawn. Both are capped by the engine's
    `max_logprobs`.

    `best_of=m` (>= n) runs m sequences and returns the n with the highest cumulative logprob, best first (vLLM
    v0); it needs sampling (it is refused with temperature 0 when m > n), and a stream of such a request sends
    only its final output, since which sequences are best is only known at the end.

    `logit_bias` maps token ids to a bias added to their logits (OpenAI semantics); values are clamped to
    [-100, 100] as OpenAI's API documents (and vLLM's server does). `allowed_token_ids` restricts the draw to
    those ids (all others are masked out). Both apply before the penalties and temperature, in every row,
    greedy included. Token ids are checked against the model's vocabulary when the request is added.

    `structured_outputs` (`StructuredOutputsParams`) constrains the output to a JSON schema, a regex, a choice
    or a grammar: each token is drawn among those the grammar accepts next (after bias and penalties, before
    temperature and top-k/top-p), and the sequence ends, with finish reason "stop", where the grammar does
    (even with `ignore_eos`). Should `min_tokens` or `allowed_token_ids` leave no token the grammar
    accepts, the grammar alone decides that draw.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("best_of", self.best_of, allow_none=True)
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequestError(f"best_of must be >= n (got best_of={self.best_of}, n={self.n})", "best_of")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2] (got {value})", name)
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0 and finite (got {self.repetition_penalty})", "repetition_penalty"
            )
        self.temperature = _check_float("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequestError(f"temperature must be >= 0 and finite (got {self.temperature})", "temperature")
        if self.best_of is not None and self.best_of > self.n and self.is_greedy:
            # vLLM refuses best_of > 1 with greedy sampling; here n > 1 greedy is allowed, so only the extra draws
            # (which would all be the same greedy sequence) are refused.
            raise InvalidRequestError(
                f"best_of must equal n (or be unset) when using greedy sampling (temperature=0): every sequence "
                f"would be the same (got best_of={self.best_of}, n={self.n})",
                "best_of",
            )
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1] (got {self.top_p})", "top_p")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be 0 or -1 (disabled) or >= 1 (got {self.top_k})", "top_k")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1] (got {self.min_p})", "min_p")
        _check_int("seed", self.seed, allow_none=True)

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        _check_int("max_tokens", self.max_tokens, minimum=1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens (got min_tokens={self.min_tokens}, max_tokens={self.max_tokens})",
                "min_tokens",
            )
        _check_int("logprobs", self.logprobs, minimum=0, allow_none=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, allow_none=True)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        self.allowed_token_ids = self._normalise_allowed_token_ids(self.allowed_token_ids)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError(
                f"structured_outputs must be a StructuredOutputsParams (got {type(self.structured_outputs).__name__})",
                "structured_outputs",
            )

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise InvalidRequestError(f"stop must be a string or a list of strings (got {stop!r})", "stop")
        if any(s == "" for s in items):
            raise InvalidRequestError("stop must not contain empty strings", "stop")
        return list(items)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of non-negative integers (got {ids!r})", "stop_token_ids"
            )
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must be a list of non-negative integers (got {token_id!r})", "stop_token_ids"
                )
        return list(ids)

    @staticmethod
    def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
        """Token id -> bias, ids as ints (JSON's string keys such as "42" are accepted), biases in [-100, 100]."""
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise InvalidRequestError(
                f"logit_bias must be a dict of token id to bias (got {type(bias).__name__})", "logit_bias"
            )
        out: dict[int, float] = {}
        for key, value in bias.items():
            token_id = key
            if isinstance(key, str) and key.strip().isdigit():
                token_id = int(key)
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidRequestError(f"logit_bias keys must be non-negative token ids (got {key!r})", "logit_bias")
            value = _check_float(f"logit_bias[{token_id}]", value)
            out[token_id] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, value))
        return out

    @staticmethod
    def _normalise_allowed_token_ids(ids: Any) -> list[int] | None:
        if ids is None:
            return None
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(
                f"allowed_token_ids must be a list of non-negative integers (got {ids!r})", "allowed_token_ids"
            )
        if not ids:
            raise InvalidRequestError(
                "allowed_token_ids must not be empty (leave it unset to allow every token)", "allowed_token_ids"
            )
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidRequestError(
                    f"allowed_token_ids must be a list of non-negative integers (got {token_id!r})", "allowed_token_ids"
                )
        return list(ids)

    def token_ids_to_check(self) -> dict[str, list[int]]:
        """The token ids this request names, by field, for the engine to check against the vocabulary."""
        named: dict[str, list[int]] = {}
        if self.stop_token_ids:
            named["stop_token_ids"] = self.stop_token_ids
        if self.logit_bias:
            named["logit_bias"] = list(self.logit_bias)
        if self.allowed_token_ids:
            named["allowed_token_ids"] = self.allowed_token_ids
        return named

    def sampling_options(self) -> SamplingOptions:
        """What the sampling worker needs of these params. A best_of request needs every drawn token's logprob (to
        rank its sequences by cumulative logprob) even when the user asked for none, so it asks for 0 internally;
        what the user sees is still decided by these params."""
        logprobs = self.logprobs
        if logprobs is None and self.num_sequences > self.n:
            logprobs = 0
        greedy = self.is_greedy  # argmax: the draw's filters would change nothing, so they are left off
        return SamplingOptions(
            temperature=0.0 if greedy else self.temperature,
            top_k=0 if greedy else self.top_k,
            top_p=1.0 if greedy else self.top_p,
            min_p=0.0 if greedy else self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            logit_bias=self.logit_bias,
            allowed_token_ids=self.allowed_token_ids,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            grammar=self.structured_outputs.spec() if self.structured_outputs is not None else None,
        )

    @property
    def num_sequences(self) -> int:
        """Sequences a request runs: best_of when set (the n of highest cumulative logprob are returned), else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax instead of drawn."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass
class BeamSearchParams:
    """Beam search settings for `LLM.beam_search` (the search is in `rayinfer.cluster.beam_search`).

    `length_penalty` ranks the final beams by `cumulative_logprob / generated_len ** length_penalty`, as
    transformers does. `temperature` only picks the token each step draws, which joins that beam's candidates
    (vLLM V1); candidates are ranked by raw logprobs, so 0 (the default) is plain beam search."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        self.temperature = _check_float("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequestError(f"temperature must be >= 0 and finite (got {self.temperature})", "temperature")
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        if not math.isfinite(self.length_penalty):
            raise InvalidRequestError(f"length_penalty must be finite (got {self.length_penalty})", "length_penalty")


__all__ = ["BeamSearchParams", "GREEDY_TEMPERATURE_EPS", "SamplingParams"]
