"""What the scheduler sends the workers for one step: only what changed since the last step. The workers own
this contract (with `StepOutput` and the `Executor` interface), so they never import the scheduler.

Workers keep, per sequence, its block table and sampling state. A plan introduces new sequences once,
appends the blocks each sequence gained, names the tokens to run, and lists the sequences the workers may
forget. Plain data: cheap to pickle to worker actors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rayinfer.workers.sampling_options import SamplingOptions

# Stands in a step's input for a token drawn by the previous step, still in flight when the step was planned:
# the workers fill it in from their own draws.
PENDING_TOKEN = -1


@dataclass
class SampleRequest:
    """A sequence's sampling state on the worker that samples (rank 0); it appends each token it draws."""

    params: SamplingOptions
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids_for_min_tokens: list[int]  # EOS (unless ignore_eos) and stop_token_ids, banned below min_tokens


@dataclass
class NewSequence:
    """Sent the first time workers see a sequence (or after they lost their state)."""

    seq_id: int
    num_prompt_tokens: int
    sampling: SampleRequest


@dataclass
class SequenceChunk:
    """The tokens of one sequence that run in this step, and the blocks its table gained."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    new_blocks: list[int]
    reset_blocks: bool  # the table starts over from new_blocks (a new or preempted sequence)
    sample: bool  # draws a token: this chunk ends the sequence's known text
    # Return logprobs (params.prompt_logprobs of them) of the prompt tokens this chunk's rows predict.
    prompt_logprobs: bool = False
    # An embedding request's last chunk: return its last row's final hidden state, L2-normalised, instead of a draw.
    pool: bool = False


@dataclass
class StepPlan:
    chunks: list[SequenceChunk]
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    # (src, dst) block pairs to copy in every layer's pool before the forward (copy on write of shared blocks).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)

    @property
    def num_samples(self) -> int:
        return sum(chunk.sample for chunk in self.chunks)
