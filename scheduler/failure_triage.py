"""Who to blame when the worker group fails, and how often it may be replaced.

A request whose step fails the same way every time (say, settings that make a worker raise) would otherwise be
recomputed after every restart and fail the group again, forever, stalling every other request on the engine.
So each failure marks the requests of the failed step as suspects; the scheduler then runs suspects one at a time
(`Scheduler._admit_waiting`), and a suspect is cleared once it has drawn one token more than it had when it was
marked. A failure whose step held exactly one suspect blames that one: it fails alone, the rest are recomputed.
Restarts are also budgeted over time: past `max_worker_restarts_per_minute`, the engine stops replacing its
workers and reports itself failed, so that Serve replaces the whole replica.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from rayinfer.scheduler.sequence import Request

WINDOW_S = 60.0


def _tokens_drawn(request: Request) -> int:
    return max((len(seq.output_token_ids) for seq in request.seqs), default=0)


class FailureTriage:
    def __init__(self, max_restarts_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_restarts_per_minute = max_restarts_per_minute
        self._clock = clock
        self._restarts: deque[float] = deque()

    def blame(self, batch: Iterable[Request]) -> list[Request]:
        """The requests to fail for a failure of a step over `batch`: its only suspect, if it had exactly one;
        otherwise none, and every request of the batch becomes a suspect."""
        requests = list({id(r): r for r in batch if not r.is_finished}.values())
        suspects = [r for r in requests if r.suspect_until is not None]
        if len(suspects) == 1:
            return suspects
        for request in requests:
            request.suspect_until = _tokens_drawn(request) + 1
        return []

    @staticmethod
    def note_progress(request: Request) -> None:
        """Clears a suspect that has drawn past the point where it was marked."""
        if request.suspect_until is not None and _tokens_drawn(request) >= request.suspect_until:
            request.suspect_until = None

    def may_restart(self) -> bool:
        """Books a restart if the last minute's budget allows one."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] >= WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts_per_minute:
            return False
        self._restarts.append(now)
        return True
