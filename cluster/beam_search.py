"""Beam search as vLLM V1 runs it: an outer loop over the engine, one token per step.

Each step runs every live beam (prompt + the beam's tokens, as a prompt of its own) for one token with
`logprobs=2 * beam_width`, so the engine returns each beam's best continuations. The candidates of all the beams
of one prompt are ranked by cumulative logprob and the best `2 * beam_width` kept, as transformers does
(`generate(num_beams=k)`): of these, the first `beam_width` that do not end the beam become the next live beams;
a candidate that ends its beam (EOS unless `ignore_eos`, or the length limit) joins the finished beams when it
ranks among the first `beam_width`. The search stops once no live beam can beat the `beam_width`-th finished
one (an exact bound, transformers' `early_stopping="never"`) or at `max_tokens`. The answer is the best
`beam_width` finished beams by transformers' length-penalized score,
`cumulative_logprob / generated_len ** length_penalty` (generated_len counts the EOS token, as transformers 5
does).

The beams of a prompt share their prefix, and the engine's prefix cache turns that into shared KV blocks: each
step recomputes only what lies past a beam's last full block (see `LLM.beam_search`).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from rayinfer.scheduler.outputs import PositionLogprobs
from rayinfer.scheduler.sampling_params import BeamSearchParams

# One engine step over a list of token sequences: for each, its next position's logprobs (candidate -> Logprob).
StepFn = Callable[[list[list[int]]], list[PositionLogprobs]]


def num_candidates(beam_width: int, num_eos_tokens: int) -> int:
    """Candidates kept per step (and asked per beam): transformers' `max(2, 1 + #EOS ids) * num_beams`, so that
    `beam_width` beams can go on even if each of the best ones ends in an EOS token."""
    return max(2, 1 + num_eos_tokens) * beam_width


@dataclass
class Beam:
    token_ids: list[int] = field(default_factory=list)  # generated so far (an EOS that ended it included)
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # per generated token, its step's candidates
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS) or "length"

    def score(self, length_penalty: float) -> float:
        """transformers' beam score: the sum of logprobs over generated_len ** length_penalty."""
        return self.cumulative_logprob / (len(self.token_ids) ** length_penalty)


@dataclass
class BeamSearchInstance:
    """The search for one prompt."""

    prompt_token_ids: list[int]
    max_new_tokens: int  # max_tokens, or less where max_model_len comes first
    live: list[Beam] = field(default_factory=lambda: [Beam()])
    finished: list[Beam] = field(default_factory=list)

    def inputs(self) -> list[list[int]]:
        return [self.prompt_token_ids + beam.token_ids for beam in self.live]

    def advance(
        self, entries: list[PositionLogprobs], params: BeamSearchParams, eos_token_ids: Collection[int], keep: int
    ) -> None:
        """Takes one step's logprobs (one dict per live beam) and moves on to the next live beams."""
        width = params.beam_width
        candidates = [
            (beam.cumulative_logprob + lp.logprob, beam, token_id, entry)
            for beam, entry in zip(self.live, entries, strict=True)
            for token_id, lp in entry.items()
        ]
        candidates.sort(key=lambda c: -c[0])  # stable: a tie keeps beam order, then the engine's rank order
        live: list[Beam] = []
        for rank, (cumulative, parent, token_id, entry) in enumerate(candidates[:keep]):
            beam = Beam(parent.token_ids + [token_id], parent.logprobs + [entry], cumulative)
            if token_id in eos_token_ids and not params.ignore_eos:
                beam.finish_reason = "stop"
            elif len(beam.token_ids) >= self.max_new_tokens:
                beam.finish_reason = "length"
            if beam.finish_reason is not None:
                if rank < width:  # only the best `width` candidates may end a beam (transformers)
                    self.finished.append(beam)
            elif len(live) < width:
                live.append(beam)
        self.live = live
        if self.live and len(self.finished) >= width and not self._can_improve(params.length_penalty, width):
            self.live = []

    def _can_improve(self, length_penalty: float, width: int) -> bool:
        """Whether the best live beam could still beat the `width`-th finished one: its logprob sum only falls, so
        its best score is now (length_penalty <= 0) or at the longest it may grow (length_penalty > 0)."""
        worst_kept = sorted((beam.score(length_penalty) for beam in self.finished), reverse=True)[width - 1]
        best = self.live[0]
        length = self.max_new_tokens if length_penalty > 0 else len(best.token_ids)
        return best.cumulative_logprob / (length**length_penalty) > worst_kept

    def best(self, params: BeamSearchParams) -> list[Beam]:
        beams = self.finished + self.live
        beams.sort(key=lambda beam: -beam.score(params.length_penalty))
        return beams[: params.beam_width]


def beam_search(
    step: StepFn,
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
    on_step: Callable[[], None] | None = None,
) -> list[list[Beam]]:
    """Runs the search for every prompt together (one engine step per token); the best beams per prompt, best
    first."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    keep = num_candidates(params.beam_width, len(eos))
    instances = [
        BeamSearchInstance(list(prompt), min(params.max_tokens, max(1, max_model_len - len(prompt))))
        for prompt in prompts
    ]
    for _ in range(params.max_tokens):
        running = [instance for instance in instances if instance.live]
        if not running:
            break
        inputs = [instance.inputs() for instance in running]
        results = step([tokens for batch in inputs for tokens in batch])
        start = 0
        for instance, batch in zip(running, inputs):
            instance.advance(results[start : start + len(batch)], params, eos, keep)
            start += len(batch)
        if on_step is not None:
            on_step()
    return [instance.best(params) for instance in instances]
