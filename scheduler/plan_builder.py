"""Turns a scheduled step into the `StepPlan` the workers run: only what changed since the plans they have seen.

It mirrors what the workers hold (how many of each live sequence's blocks they were sent, which ended sequences
they may forget), so a plan introduces a sequence once, sends each block once, and resends a table only when
it changed under them (preemption, copy on write).
"""
from __future__ import annotations

from rayinfer.scheduler.block_manager import BlockCopy
from rayinfer.scheduler.scheduler import SchedulerOutput
from rayinfer.scheduler.sequence import Sequence
from rayinfer.workers.step_plan import NewSequence, SampleRequest, SequenceChunk, StepPlan


class PlanBuilder:
    def __init__(self) -> None:
        self._sent_blocks: dict[int, int] = {}  # seq_id -> blocks of its table the workers hold
        self._forget: list[int] = []  # ended sequences the next plan tells the workers to drop

    def build(self, scheduled: SchedulerOutput, copies: list[BlockCopy]) -> StepPlan:
        for seq in scheduled.preempted:
            if seq.seq_id in self._sent_blocks:
                self._sent_blocks[seq.seq_id] = 0  # its blocks are gone: the table starts over
        for copy in copies:
            if copy.seq.seq_id in self._sent_blocks:
                self._sent_blocks[copy.seq.seq_id] = 0  # a block mid-table changed: resend the table
        plan = StepPlan(chunks=[], finished_seq_ids=self.take_forgotten())
        plan.block_copies = [(copy.src, copy.dst) for copy in copies]
        for item in scheduled.scheduled:
            seq = item.seq
            sent = self._sent_blocks.get(seq.seq_id)
            if sent is None:
                plan.new_sequences.append(NewSequence(seq.seq_id, seq.num_prompt_tokens, _sample_request(seq)))
                sent = 0
            start = seq.num_computed_tokens
            plan.chunks.append(
                SequenceChunk(
                    seq_id=seq.seq_id,
                    token_ids=seq.input_tokens(start, item.num_new_tokens),
                    start_position=start,
                    new_blocks=seq.block_table[sent:],
                    reset_blocks=sent == 0,
                    sample=item.samples,
                    pool=item.pools,
                )
            )
            self._sent_blocks[seq.seq_id] = len(seq.block_table)
        return plan

    def release(self, seq: Sequence) -> None:
        """The sequence ended: the workers drop it with the next plan (if they ever saw it)."""
        if self._sent_blocks.pop(seq.seq_id, None) is not None:
            self._forget.append(seq.seq_id)

    def take_forgotten(self) -> list[int]:
        forget, self._forget = self._forget, []
        return forget

    @property
    def has_forgotten(self) -> bool:
        return bool(self._forget)

    def workers_lost(self) -> None:
        """A fresh worker group holds nothing: every sequence is introduced again."""
        self._sent_blocks.clear()
        self._forget = []


def _sample_request(seq: Sequence) -> SampleRequest:
    request = seq.request
    return SampleRequest(
        params=request.sampling_options,
        seed=seq.seed,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=list(seq.output_token_ids),  # the sampling worker extends its own copy
        stop_ids_for_min_tokens=sorted(request.stop_token_ids) if request.params.min_tokens else [],
    )
