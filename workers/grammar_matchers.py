"""Each constrained sequence's grammar matcher on this rank, and the token bitmask a step's draws are masked with.

Every rank keeps its own matchers and masks alike: all ranks draw (same logits, same counter-based randomness),
so all must forbid the same tokens. A matcher is made when a sequence reaches the workers (`NewSequence`) and
replays the outputs the sequence already has, so a sequence sent again (after the workers were replaced) or a
fork starts where its text stands; it then accepts each token this rank draws. Preemption by recompute keeps
the workers' state (and the matcher with it), since the recomputed tokens are ones the matcher has accepted.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rayinfer.workers.grammar import GrammarCompiler, GrammarError
from rayinfer.workers.step_plan import StepPlan

logger = logging.getLogger(__name__)


@dataclass
class GrammarMask:
    """A step's grammar constraint, in the rows of its sampling chunks."""

    bitmask: Tensor  # [B, ceil(V / 32)] int32 on the logits' device; all bits set in unconstrained rows
    may_empty: bool  # some constrained row also bans or restricts ids: a draw may need the grammar alone


@dataclass
class _Constrained:
    matcher: Any  # xgrammar.GrammarMatcher
    may_conflict: bool  # min_tokens or allowed_token_ids could leave no token the grammar accepts


class GrammarMatchers:
    """The matchers of this rank's constrained sequences, kept current by the plans and the drawn tokens."""

    def __init__(self, compiler: Callable[[], GrammarCompiler], vocab_size: int, device: torch.device) -> None:
        self._compiler = compiler  # built on first use: it needs the tokenizer, which most engines never load here
        self.vocab_size = vocab_size
        self.device = device
        self._live: dict[int, _Constrained] = {}  # seq_id -> its matcher
        self._broken: dict[int, str] = {}  # seq_id -> why it has no matcher; its next draw fails its request
        self._bitmask: Tensor | None = None  # host buffer, grown to the largest step
        self._batch_matcher: Any = None

    def __len__(self) -> int:
        return len(self._live) + len(self._broken)

    def apply(self, plan: StepPlan) -> None:
        """Drops the plan's finished sequences and makes a matcher for each new constrained one."""
        for seq_id in plan.finished_seq_ids:
            self._live.pop(seq_id, None)
            self._broken.pop(seq_id, None)
        for new in plan.new_sequences:
            self._live.pop(new.seq_id, None)
            self._broken.pop(new.seq_id, None)
            params = new.sampling.params
            if params.grammar is None:
                continue
            try:
                matcher = self._compiler().matcher(params.grammar)
            except GrammarError as exc:  # the engine checked it, so only a worker-side fault lands here
                self._broken[new.seq_id] = f"structured output: {exc}"
                continue
            for token in new.sampling.output_token_ids:
                if not matcher.accept_token(token):
                    self._broken[new.seq_id] = f"structured output: its earlier output token {token} breaks the grammar"
                    break
            else:
                conflict = params.min_tokens > 0 or bool(params.allowed_token_ids)
                self._live[new.seq_id] = _Constrained(matcher, conflict)

    def step_mask(self, seq_ids: Sequence[int]) -> GrammarMask | None:
        """The bitmask of a step that samples `seq_ids` (in this order), or None when none of them is constrained."""
        if not self._live:
            return None
        rows = [(i, self._live[seq_id]) for i, seq_id in enumerate(seq_ids) if seq_id in self._live]
        if not rows:
            return None
        import xgrammar

        bitmask = self._host_bitmask(len(seq_ids))
        bitmask.fill_(-1)  # every bit set: unconstrained rows allow every token
        filling = [(i, c.matcher) for i, c in rows if not c.matcher.is_terminated()]
        if filling:
            if self._batch_matcher is None:
                # On a CPU engine torch has the cores; beside a GPU, the host's cores are free to fill masks.
                threads = 1 if self.device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
                self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=threads)
            indices, matchers = zip(*filling)
            self._batch_matcher.batch_fill_next_token_bitmask(list(matchers), bitmask, indices=list(indices))
        # A matcher that ended (its stop token was drawn) only runs again in a step planned before the engine saw
        # that token, whose draw the engine drops: it is left unconstrained.
        device_mask = bitmask.to(self.device, non_blocking=True) if self.device.type != "cpu" else bitmask.clone()
        return GrammarMask(device_mask, any(c.may_conflict for _, c in rows))

    def accept(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> dict[int, str] | None:
        """Advances each constrained sequence's matcher by the token it drew; returns the sequences whose token the
        grammar refused (or that have no matcher), with why: their requests fail."""
        failed: dict[int, str] = {}
        advancing: list[tuple[int, Any, int]] = []
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            constrained = self._live.get(seq_id)
            if constrained is None:
                if seq_id in self._broken:
                    failed[seq_id] = self._broken[seq_id]
            elif not constrained.matcher.is_terminated():  # an ended one: see step_mask, the engine drops this draw
                advancing.append((seq_id, constrained.matcher, token))
        if advancing:
            import xgrammar

            _, matchers, tokens = zip(*advancing)
            accepted = xgrammar.BatchGrammarMatcher.batch_accept_token(list(matchers), list(tokens))
            for (seq_id, _, token), ok in zip(advancing, accepted):
                if not ok:
                    failed[seq_id] = f"structured output: the grammar refused drawn token {token}"
                    logger.error("sequence %d: %s", seq_id, failed[seq_id])
        return failed or None

    def _host_bitmask(self, rows: int) -> Tensor:
        buffer = self._bitmask
        if buffer is None or buffer.shape[0] < rows:
            import xgrammar

            buffer = xgrammar.allocate_token_bitmask(max(rows, 2 * (0 if buffer is None else buffer.shape[0])),
                                                     self.vocab_size)
            if self.device.type == "cuda":
                buffer = buffer.pin_memory()
            self._bitmask = buffer
        return buffer[:rows]
