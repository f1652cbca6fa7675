"""How a request wants its tokens drawn: `SamplingParams` (vLLM's fields and defaults) and `BeamSearchParams`.

Both are plain dataclasses checked once in `__post_init__`, so a bad value fails when the request is made,
with a message naming the field, instead of deep inside a worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy decoding (argmax).
GREEDY_TEMPERATURE_EPS = 1e-5


def _check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''} (got {value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (got {value})")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number (got {value!r})")
    return float(value)


@dataclass
class SamplingParams:
    """Per-request sampling settings; `stop`, `stop_token_ids` and `top_k` are normalised on creation."""

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

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("best_of", self.best_of, allow_none=True)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n (got best_of={self.best_of}, n={self.n})")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (got {value})")
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0 and finite (got {self.repetition_penalty})")
        self.temperature = _check_float("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite (got {self.temperature})")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1 (got {self.top_k})")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (got {self.min_p})")
        _check_int("seed", self.seed, allow_none=True)

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        _check_int("max_tokens", self.max_tokens, minimum=1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens (got min_tokens={self.min_tokens}, max_tokens={self.max_tokens})"
            )
        _check_int("logprobs", self.logprobs, minimum=0, allow_none=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, allow_none=True)

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop must be a string or a list of strings (got {stop!r})")
        if any(s == "" for s in items):
            raise ValueError("stop must not contain empty strings")
        return list(items)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers (got {ids!r})")
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"stop_token_ids must be a list of non-negative integers (got {token_id!r})")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax instead of drawn."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass
class BeamSearchParams:
    """Beam search settings (validated here; the search itself lives in the engine)."""

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
            raise ValueError(f"temperature must be >= 0 and finite (got {self.temperature})")
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite (got {self.length_penalty})")


__all__ = ["BeamSearchParams", "GREEDY_TEMPERATURE_EPS", "SamplingParams"]
