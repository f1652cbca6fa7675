"""Logprobs as the user sees them: the workers' top-k ids, logprobs and ranks turned into `Logprob` dicts, per
drawn token and, once per request, per prompt token (however its prompt was chunked, shared or recomputed)."""
from __future__ import annotations

from typing import Any

from rayinfer.scheduler.outputs import Logprob, PositionLogprobs
from rayinfer.scheduler.scheduler import SchedulerOutput
from rayinfer.scheduler.sequence import Request, Sequence
from rayinfer.workers.step_output import TopLogprobs
from rayinfer.workers.step_plan import StepPlan


class LogprobRecorder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._decoded: dict[int, str] = {}  # token id -> its text alone, for Logprob.decoded_token

    @staticmethod
    def ask_for_prompt_logprobs(plan: SchedulerOutput, step_plan: StepPlan) -> None:
        """Marks the chunks whose rows score prompt tokens not asked for yet: each prompt token is scored once
        per request, by whichever sequence computes it first, and not again when a preempted sequence
        recomputes its prompt."""
        wanting = {
            s.seq.seq_id: s.seq.request for s in plan.scheduled if s.seq.request.params.prompt_logprobs is not None
        }
        if not wanting:
            return
        for chunk in step_plan.chunks:
            request = wanting.get(chunk.seq_id)
            if request is None:
                continue
            end = min(chunk.start_position + len(chunk.token_ids), len(request.prompt_token_ids) - 1)
            if end > request.prompt_logprobs_asked:
                chunk.prompt_logprobs = True
                request.prompt_logprobs_asked = end

    def record_prompt(
        self, plan: SchedulerOutput, results: dict[int, tuple[int, list[TopLogprobs]]]
    ) -> None:
        seqs = {s.seq.seq_id: s.seq for s in plan.scheduled}
        for seq_id, (first_position, entries) in results.items():
            seq = seqs.get(seq_id)
            if seq is None or seq.is_finished:
                continue
            request = seq.request
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None] * len(request.prompt_token_ids)
            for position, entry in enumerate(entries, start=first_position):
                if request.prompt_logprobs[position] is None:  # a recomputed prompt scores it again: keep the first
                    request.prompt_logprobs[position] = self._as_dict(entry)
                    request.num_prompt_logprobs += 1

    def record(self, seq: Sequence, entry: TopLogprobs) -> None:
        if seq.request.params.logprobs is not None:  # else only asked internally (best_of) for the sum
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(self._as_dict(entry))
        seq.cumulative_logprob += entry.logprobs[0]

    def _as_dict(self, entry: TopLogprobs) -> PositionLogprobs:
        """Token id -> Logprob, the scored token first; when it is also in the top k, that entry wins (as vLLM)."""
        return {
            token_id: Logprob(logprob, rank, self.decoded_token(token_id))
            for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)
        }

    def decoded_token(self, token_id: int) -> str:
        """The token's text on its own, as vLLM reports it: the tokenizer's decode of that one id."""
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    def prompt_output(request: Request) -> list[PositionLogprobs | None] | None:
        """The request's prompt logprobs once every prompt token has them; None before (or when not asked)."""
        if request.params.prompt_logprobs is None or request.num_prompt_logprobs < len(request.prompt_token_ids) - 1:
            return None
        if request.prompt_logprobs is None:  # a one-token prompt: nothing predicts its only token
            request.prompt_logprobs = [None] * len(request.prompt_token_ids)
        return request.prompt_logprobs
