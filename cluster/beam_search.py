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

`BeamSearch` holds the algorithm and is driven one step at a time: by `beam_search` over the offline engine and
by `beam_search_async` in the server, whose step runs each beam as an engine call of its own, concurrently.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from rayinfer.scheduler.outputs import PositionLogprobs
from rayinfer.scheduler.sampling_params import BeamSearchParams

# One engine step over a list of token sequences: for each, its next position's logprobs (candidate -> Logprob).
StepFn = Callable[[list[list[int]]], list[PositionLogprobs]]
AsyncStepFn = Callable[[list[list[int]]], Awaitable[list[PositionLogprobs]]]


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


class BeamSearch:
    """The search for several prompts, driven one engine step at a time by its caller: `inputs()` gives the token
    sequences to run for one token (every live beam of every prompt still searching), `advance()` takes their
    next-position logprobs in the same order, until `done`; `results()` then gives each prompt's best beams.
    `beam_search` drives it with a synchronous engine (`LLM.beam_search`), `beam_search_async` with an async one
    (the server, one engine call per beam)."""

    def __init__(
        self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: Collection[int], max_model_len: int
    ) -> None:
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.keep = num_candidates(params.beam_width, len(self.eos_token_ids))
        self.instances = [
            BeamSearchInstance(list(prompt), min(params.max_tokens, max(1, max_model_len - len(prompt))))
            for prompt in prompts
        ]
        self.steps = 0
        self._batches: list[tuple[BeamSearchInstance, int]] = []  # the last `inputs()`: instance, its count

    @property
    def done(self) -> bool:
        return self.steps >= self.params.max_tokens or not any(instance.live for instance in self.instances)

    def inputs(self) -> list[list[int]]:
        """The sequences of this step, each to run for one token (prompt + a live beam's tokens)."""
        flat: list[list[int]] = []
        self._batches = []
        for instance in self.instances:
            if instance.live:
                batch = instance.inputs()
                self._batches.append((instance, len(batch)))
                flat.extend(batch)
        return flat

    def advance(self, results: list[PositionLogprobs]) -> None:
        """Takes the step's logprobs, one dict per sequence of the last `inputs()`, in its order."""
        expected = sum(count for _, count in self._batches)
        if len(results) != expected:
            raise ValueError(f"beam search: {len(results)} step results for {expected} sequences")
        start = 0
        for instance, count in self._batches:
            instance.advance(results[start : start + count], self.params, self.eos_token_ids, self.keep)
            start += count
        self._batches = []
        self.steps += 1

    def results(self) -> list[list[Beam]]:
        """Per prompt, its best `beam_width` beams, best first."""
        return [instance.best(self.params) for instance in self.instances]


def step_logprobs(params: BeamSearchParams, eos_token_ids: Collection[int], vocab_size: int) -> int:
    """The candidates each step asks per beam (the engine's `logprobs`): `num_candidates`, at most the vocabulary."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    return min(num_candidates(params.beam_width, len(eos)), vocab_size)


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
    search = BeamSearch(prompts, params, eos_token_ids, max_model_len)
    while not search.done:
        search.advance(step(search.inputs()))
        if on_step is not None:
            on_step()
    return search.results()


async def beam_search_async(
    step: AsyncStepFn,
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
) -> list[list[Beam]]:
    """`beam_search` with an async engine step (the server's: one engine call per sequence, run concurrently)."""
    search = BeamSearch(prompts, params, eos_token_ids, max_model_len)
    while not search.done:
        search.advance(await step(search.inputs()))
    return search.results()
