"""What a request returns, shaped as vLLM returns it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token at one position: its log-probability under the model's raw logits (before penalties,
    temperature, top-k/p and logit_bias), its 1-based rank by raw logit (1 = argmax), and its own text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob, for the top k tokens plus the token actually there (so k or k + 1 entries).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the drawn tokens' logprobs; None unless logprobs asked
    logprobs: list[PositionLogprobs] | None = None  # one dict per token of token_ids, when logprobs asked
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why the request ended early, when it did
    # One entry per prompt token when prompt_logprobs asked (the first None: nothing predicts it).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
