"""The contract between the engine and whatever runs its steps (in-process worker or Ray worker actors)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from rayinfer.workers.grammar import GrammarSpec
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan


class WorkerGroupFailure(RuntimeError):
    """A worker died or stopped answering; `Executor.restart` may bring up a fresh group."""


class Executor(ABC):
    """Runs steps on one or more workers that hold the model and the KV pool."""

    num_blocks: int
    # True when steps may be submitted before earlier ones finish (the workers run them in order).
    pipelined: bool = False
    # Pipeline stages keep this many steps in flight, each over sequences of its own (micro-batches); 1: none.
    micro_batches: int = 1

    @property
    def max_steps_in_flight(self) -> int:
        """How many steps the engine keeps sent ahead of their results."""
        if self.micro_batches > 1:
            return self.micro_batches
        return 2 if self.pipelined else 1

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepOutput | list[int]:
        """Runs one step; returns the token drawn for each chunk that samples, in plan order, with the logprobs
        asked for (a bare list of tokens is accepted too: no logprobs).

        Raises WorkerGroupFailure when a worker is lost; the workers' per-sequence state is then gone.
        """

    def submit(self, plan: StepPlan) -> object:
        """Starts a step; `result` of the returned handle gives its tokens. Runs it at once unless pipelined."""
        try:
            return self.execute(plan)
        except WorkerGroupFailure as exc:
            return exc

    def result(self, handle: object) -> StepOutput | list[int]:
        if isinstance(handle, WorkerGroupFailure):
            raise handle
        return handle  # type: ignore[return-value]

    def prepare_grammar(self, spec: GrammarSpec) -> tuple[str, str] | None:
        """Has every worker compile a structured output's grammar ahead of its sequences, off their step loop;
        returns (kind, why) when it does not compile. Callable from any thread. By default nothing is prepared
        and a worker compiles a grammar when its first sequence arrives."""
        return None

    def restart(self) -> None:
        """Replaces a failed worker group with a fresh one with the same block count; raises if it cannot."""
        raise WorkerGroupFailure("this executor cannot replace its workers")

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Releases workers; the in-process executor has nothing to release."""
