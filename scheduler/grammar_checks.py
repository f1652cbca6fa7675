"""Whether a structured output's constraint compiles: asked of the workers, which compile it beside their step
loop and keep it for the request's sequences, once per constraint; the answer is remembered.

`AsyncEngine.open` asks from a thread of its own before it hands the request to the step loop, so a slow compile
delays only its own request; the engine's `add_request` then finds the answer here (an offline engine, with no
loop to protect, compiles in `add_request`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.workers.executor_interface import Executor
from rayinfer.workers.grammar import GrammarSpec


class GrammarChecks:
    def __init__(self, executor: Executor, max_remembered: int = 1024) -> None:
        self._executor = executor
        self._answers: OrderedDict[GrammarSpec, tuple[str, str] | None] = OrderedDict()
        self._max_remembered = max_remembered
        self._lock = threading.Lock()  # the step thread and the callers' threads both ask

    def check(self, spec: GrammarSpec) -> None:
        """Raises InvalidRequestError naming `structured_outputs.<kind>` when `spec` does not compile."""
        with self._lock:
            known = spec in self._answers
            problem = self._answers.get(spec)
        if not known:
            problem = self._executor.prepare_grammar(spec)
            with self._lock:
                self._answers[spec] = problem
                while len(self._answers) > self._max_remembered:
                    self._answers.popitem(last=False)
        if problem is not None:
            kind, why = problem
            raise InvalidRequestError.about(f"structured_outputs.{kind}", why)
