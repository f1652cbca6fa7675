"""Requests and the sequences they generate, as the scheduler and output processor see them."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rayinfer.scheduler.pooling_params import PoolingParams
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.step_plan import PENDING_TOKEN

if TYPE_CHECKING:
    from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
    from rayinfer.scheduler.outputs import PositionLogprobs



class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a prompt; holds KV blocks while it runs."""

    seq_id: int
    request: Request
    index: int
    seed: int
    token_ids: list[int]
    num_prompt_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens a step in flight will draw: already scheduled (so the next step can be planned before they are
    # known) but not yet in token_ids. Workers fill them in from their own draws.
    num_pending_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache hashes of the table's leading full blocks (chained: each covers every token up to its end).
    block_hashes: list[bytes] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    detokenizer: IncrementalDetokenizer | None = None
    # One dict per output token when params.logprobs is set (filled as tokens arrive), and their sum (also kept,
    # without the dicts, for a best_of request that did not ask for logprobs: it ranks the sequences).
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    # What the request's deltas have carried so far (see output_deltas.py).
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    finish_sent: bool = False

    @property
    def arrival(self) -> int:
        return self.request.arrival

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not in the pool yet: the prompt (or a preempted sequence's whole text) or the newest token."""
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    def input_tokens(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of the text, a pending token as PENDING_TOKEN."""
        known = self.token_ids[start : start + count]
        return known + [PENDING_TOKEN] * (count - len(known))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Adds a drawn token; it was pending if a step in flight had already planned around it."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.num_pending_tokens = max(0, self.num_pending_tokens - 1)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    max_tokens: int  # resolved: params.max_tokens or what fits in max_model_len
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) and params.stop_token_ids
    eos_token_ids: frozenset[int]
    seqs: list[Sequence] = field(default_factory=list)  # params.num_sequences of them
    # Sequences 1..n-1 until sequence 0 has computed all of the prompt but its last token; then they fork from
    # it, sharing its blocks, so the prompt is computed and stored once.
    forks_pending: list[Sequence] = field(default_factory=list)
    error: str | None = None
    # When params.prompt_logprobs is set: one entry per prompt token (the first stays None), filled as steps
    # return them; how many are filled; and how far (in positions) steps have been asked to score the prompt.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_prompt_logprobs: int = 0
    prompt_logprobs_asked: int = 0
    # Whether a delta has carried the prompt (and its ids) and the prompt logprobs: each travels once.
    prompt_sent: bool = False
    prompt_logprobs_sent: bool = False
    # Set when a step of this request failed the worker group: it runs alone among suspects until it has drawn
    # this many tokens (see failure_triage.py).
    suspect_until: int | None = None
    # An embedding request (prefill only): how to pool its prompt, and the embedding once its last chunk ran.
    pooling: PoolingParams | None = None
    embedding: list[float] | None = None

    def __post_init__(self) -> None:
        # What the sampling worker gets: `params` lowered once, when the request is made.
        self.sampling_options: SamplingOptions = self.params.sampling_options()

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
