"""How the sampling worker draws one sequence's tokens: the lowered, worker-side form of a request's sampling
parameters.

The scheduler checks and normalises what a user asked for (`rayinfer.scheduler.SamplingParams`) and lowers it to
this when a sequence first reaches the workers: only the fields the sampler and the logprob rows read, greedy
already decided (temperature 0), top-k 0 meaning off. Workers never see the user-facing type, so the step
contract does not depend on the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

from rayinfer.workers.grammar import GrammarSpec


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy (argmax); every filter below is then ignored
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # stop ids are banned until this many tokens are out
    logit_bias: dict[int, float] | None = None  # token id -> bias, already clamped
    allowed_token_ids: list[int] | None = None  # None: every id
    logprobs: int | None = None  # top-k logprobs of each drawn token (None: none)
    prompt_logprobs: int | None = None  # top-k logprobs of each prompt token (None: none)
    grammar: GrammarSpec | None = None  # structured output: only tokens the grammar accepts next are drawn

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def any_penalty(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


GREEDY = SamplingOptions()
