"""Hands a step's intermediate state from one pipeline stage to the next, rank to rank.

Tensor-parallel rank t of stage s sends to rank t of stage s + 1 with torch.distributed point-to-point (gloo on
CPU, NCCL on GPU: the transport the stages' collectives already use), one message per step holding hidden
states and residual side by side. Every stage receives the same plans in the same order, so the receiver knows
the message's shape from the plan and neither side sends a header. Rayinfer chose this over Ray's compiled-graph
channels because the CPU workers take their steps over a step channel, not a compiled graph, and the p2p path is
the same on both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rayinfer.workers.models.pipeline import IntermediateState
from rayinfer.workers.parallel_state import PipelineStage
from rayinfer.workers.step_plan import StepPlan


def plan_tokens(plan: StepPlan) -> int:
    """Rows of the step's forward: every chunk's tokens (stages run eagerly, so nothing pads them)."""
    return sum(len(chunk.token_ids) for chunk in plan.chunks)


class StageLink:
    def __init__(self, stage: PipelineStage, rank: int, tp_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.stage = stage
        self.previous_rank = None if stage.is_first else rank - tp_size
        self.next_rank = None if stage.is_last else rank + tp_size
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def receive(self, plan: StepPlan) -> IntermediateState | None:
        """The previous stage's output for `plan` (None on the first stage, or for a plan with nothing to run)."""
        tokens = plan_tokens(plan)
        if self.previous_rank is None or tokens == 0:
            return None
        both = torch.empty(tokens, 2 * self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(both, src=self.previous_rank)
        hidden, residual = both.split(self.hidden_size, dim=1)
        return IntermediateState(hidden.contiguous(), residual.contiguous())

    def send(self, state: IntermediateState | None) -> None:
        """This stage's output to the next stage (a plan with nothing to run sends nothing, as it receives none)."""
        if self.next_rank is None or state is None:
            return
        dist.send(torch.cat([state.hidden, state.residual], dim=1).contiguous(), dst=self.next_rank)


@dataclass
class StageTiming:
    """How long a stage computed over the steps since it was made, and the span they covered (first start to last
    end): busy_s / span_s is the stage's busy share; the rest it waited (for a plan or the previous stage)."""

    busy_s: float = 0.0
    first_start: float | None = None
    last_end: float = 0.0
    steps: int = 0

    def add(self, start: float, end: float) -> None:
        self.first_start = start if self.first_start is None else self.first_start
        self.busy_s += end - start
        self.last_end = end
        self.steps += 1

    @property
    def span_s(self) -> float:
        return 0.0 if self.first_start is None else self.last_end - self.first_start
