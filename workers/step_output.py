"""What a step returns from the worker that samples: the drawn tokens, and logprobs for the rows that asked.

Plain lists, cheap to pickle back from a worker actor. A step in which no sequence asked for logprobs carries
only the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TopLogprobs:
    """Logprobs at one position: the scored token first (the one drawn, or the actual prompt token), then the
    top k by raw logit. Ranks are 1-based (1 = argmax); the same id may appear twice (scored and in the top k)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class StepOutput:
    token_ids: list[int]  # the token drawn for each chunk that samples, in plan order
    # seq_id -> logprobs of the token it drew, for sequences whose params ask for logprobs.
    logprobs: dict[int, TopLogprobs] | None = None
    # seq_id -> (position of the first prompt token scored, one entry per prompt token scored from there on),
    # for chunks the plan marked with `prompt_logprobs`.
    prompt_logprobs: dict[int, tuple[int, list[TopLogprobs]]] | None = None
    # seq_id -> its embedding (the final hidden state of its last token, L2-normalised), for chunks marked `pool`.
    embeddings: dict[int, list[float]] | None = None
    # seq_id -> why its draw failed (its token is a placeholder); the engine fails its request alone.
    failed: dict[int, str] | None = None
