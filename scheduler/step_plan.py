"""What the scheduler hands the executor for one step: plain data, cheap to pickle to worker actors."""
from __future__ import annotations

from dataclasses import dataclass

from rayinfer.scheduler.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """Everything the sampler needs for one sequence that draws a token this step."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids_for_min_tokens: list[int]


@dataclass
class SequenceChunk:
    """The tokens of one sequence that run in this step, and where their K/V goes."""

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    num_prompt_tokens: int
    sample: SampleRequest | None  # None while a prompt chunk leaves more of the prompt for later steps


@dataclass
class StepPlan:
    chunks: list[SequenceChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)

    @property
    def num_samples(self) -> int:
        return sum(chunk.sample is not None for chunk in self.chunks)
