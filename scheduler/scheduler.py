"""Iteration-level scheduling under a per-step token budget (continuous batching with chunked prefill).

Each step: running sequences that decode go first (one token each), then running sequences still in the
middle of their prompt, then waiting sequences in arrival order, each taking as much of the remaining budget
as it needs (a prompt larger than what is left is split across steps). When the pool cannot hold a running
sequence's next tokens, the newest running sequence is preempted: its blocks are freed and it is recomputed
from its text later. The oldest running sequence can always proceed, so there is no deadlock.
"""
from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from rayinfer.scheduler.block_manager import BlockManager
from rayinfer.scheduler.sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    samples: bool  # a sequence draws a token once this step leaves none of its known tokens uncomputed
    pools: bool = False  # ...or, for an embedding request, returns its embedding there instead

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        ends_text = num_new_tokens == seq.num_uncomputed_tokens
        pooling = seq.request.pooling is not None
        return cls(seq, num_new_tokens, ends_text and not pooling, ends_text and pooling)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order: the last one is the first to preempt
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, micro_batches: int = 1) -> SchedulerOutput:
        """The next step. With `micro_batches` > 1 (pipeline stages kept busy by as many steps in flight), a
        sequence whose drawn token is still in flight sits this step out, and each step decodes at most its share
        of the decoding sequences, so the steps in flight hold disjoint, even halves (or thirds, ...)."""
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens
        for seq in list(self.running):
            if seq.request.forks_pending and seq.num_computed_tokens == seq.num_prompt_tokens - 1:
                self._fork(seq)
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        if micro_batches > 1:
            share = -(-len(decoding) // micro_batches)
            decoding = [s for s in decoding if not s.num_pending_tokens][:share]
            prefilling = [s for s in prefilling if not s.num_pending_tokens]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            num_new = min(self._tokens_to_compute(seq), budget)
            if self._make_room(seq, num_new, out):
                self.block_manager.allocate(seq, num_new)
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
                out.scheduled.append(ScheduledSequence.of(seq, num_new))
                budget -= num_new
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    @staticmethod
    def _tokens_to_compute(seq: Sequence) -> int:
        """A request's first sequence stops one token short of its prompt's end until its siblings fork from it."""
        if seq.request.forks_pending:
            return seq.num_prompt_tokens - 1 - seq.num_computed_tokens
        return seq.num_uncomputed_tokens

    def _fork(self, seq: Sequence) -> None:
        """Starts the request's other sequences on `seq`'s blocks; each computes the prompt's last token itself,
        copying the shared last block first if it is only partly filled."""
        position = self.running.index(seq) + 1
        for sibling in seq.request.forks_pending:
            self.block_manager.share(seq, sibling)
            sibling.num_computed_tokens = seq.num_computed_tokens
            sibling.status = SequenceStatus.RUNNING
            self.running.insert(position, sibling)
            position += 1
        seq.request.forks_pending = []

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Preempts the newest running sequences until `seq` fits; False if `seq` itself had to go."""
        while not self.block_manager.can_allocate(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def preempt_all(self) -> None:
        """Sends every running sequence back to the queue for recompute (the workers lost their KV caches, and
        the draws of any step in flight with them)."""
        out = SchedulerOutput()
        for seq in reversed(list(self.running)):
            self._preempt(seq, out)
        for seq in self.waiting:
            seq.num_pending_tokens = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        for i, scheduled in enumerate(out.scheduled):
            if scheduled.seq is seq:
                del out.scheduled[i]
                break
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        # Preempted sequences are older than anything still waiting, so they go back in front (oldest first).
        position = 0
        while position < len(self.waiting) and self.waiting[position].arrival <= seq.arrival:
            position += 1
        self.waiting.insert(position, seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
        logger.debug("preempted sequence %d (%d tokens) to free KV blocks", seq.seq_id, seq.num_tokens)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        held = self._num_seqs_held()
        suspect_running: Request | None | bool = False  # looked up only when a suspect waits (rarely)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            seqs = 1 + len(seq.request.forks_pending)
            if held + seqs > self.limits.max_num_seqs:
                break
            if seq.request.suspect_until is not None:
                # Requests in a step that failed the worker group run one at a time until cleared (failure_triage.py).
                if suspect_running is False:
                    suspect_running = next((s.request for s in self.running if s.request.suspect_until is not None),
                                           None)
                if suspect_running is not None and suspect_running is not seq.request:
                    break
                suspect_running = seq.request
            if seq.request.params.prompt_logprobs is None:  # those need the logits of every prompt position
                # A sequence its siblings fork from must still compute a token before the fork point.
                leave = 2 if seq.request.forks_pending else 1
                seq.num_computed_tokens = self.block_manager.take_cached_prefix(seq, tokens_to_leave=leave)
            num_new = self._tokens_to_compute(seq)
            if num_new > budget:
                if not self.limits.enable_chunked_prefill:
                    self._drop_cached_prefix(seq)
                    break
                num_new = budget
            # The watermark keeps room for running sequences to grow; with none running it has nothing to protect,
            # and holding it back would strand a sequence that fits the pool but not the pool minus the watermark.
            if not self.block_manager.can_allocate(seq, num_new, admitting=bool(self.running)):
                self._drop_cached_prefix(seq)
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            keys = [s.arrival for s in self.running]
            self.running.insert(bisect.bisect_right(keys, seq.arrival), seq)
            out.scheduled.append(ScheduledSequence.of(seq, num_new))
            budget -= num_new
            held += seqs

    def _num_seqs_held(self) -> int:
        """Running sequences plus the siblings that will fork from them."""
        return len(self.running) + sum(len(seq.request.forks_pending) for seq in self.running)

    def _drop_cached_prefix(self, seq: Sequence) -> None:
        """A sequence that stays waiting holds no blocks (it looks its prefix up again when admitted)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

    def finish(self, seq: Sequence) -> None:
        """Releases a sequence that ended (finished, aborted or failed) wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.num_pending_tokens = 0  # a draw still in flight for it is dropped
        seq.status = SequenceStatus.FINISHED
