"""Steps from the engine to its Ray worker actors over one authenticated connection per rank.

Ray starts, places, watches and kills the workers; this channel carries each step's plan to them and their
outputs back, once per generated token. A Ray actor call costs 0.76 ms on the idle 2-core machine and 2-4 ms
inside a busy Serve replica; a round trip here costs about 0.02 ms (BENCHMARKS.md, serving path). The
connections use `multiprocessing.connection` with a random key per worker group: a plan is a pickle, so only a
peer that proves it holds the key may send one.

The worker serves its channel on the actor's main thread (a method call that runs until the channel closes), not
on a thread of its own: a CPU forward on a second thread runs with a second OpenMP team, and MKL matmuls ran
about 2x slower there on the 2-core machine (also without Ray), probably because with more OpenMP threads than
cores libgomp stops spinning between parallel regions; a decode step of llama-56m took 11 ms on a second thread
against 7.6 ms on the main one.
"""
from __future__ import annotations

import logging
import pickle
import socket
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener, wait

from rayinfer.workers.executor_interface import WorkerGroupFailure
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan

logger = logging.getLogger(__name__)

Address = tuple[str, int]


def _no_delay(conn: Connection) -> None:
    """Sends each message at once: a message's length and body go out as two writes, which Nagle's algorithm
    would hold back for the peer's (delayed) acknowledgement."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()  # the descriptor stays the Connection's


class WorkerCall(tuple):
    """A message asking the worker to run one of its methods: (method name, args)."""


class StepServer:
    """Worker side: a listener made at once, and `serve`, which takes the engine's connection and answers each
    message in order: a `StepPlan` with `run_step(plan)`, a `WorkerCall` with `call(name, args)`."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address: Address = self._listener.address

    def _accept(self) -> Connection | None:
        while True:
            try:
                conn = self._listener.accept()
            except AuthenticationError:  # not our engine: keep waiting for it
                logger.warning("step channel: refused a connection that failed authentication")
                continue
            except OSError:  # the listener was closed
                return None
            self._listener.close()
            _no_delay(conn)
            return conn

    def serve(self, run_step: Callable[[StepPlan], StepOutput | None], call: Callable[[str, tuple], object]) -> None:
        """Answers the engine until it closes the channel."""
        conn = self._accept()
        if conn is None:
            return
        with conn:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the engine closed the channel
                    return
                try:
                    value = call(*message) if isinstance(message, WorkerCall) else run_step(message)
                    reply = ("ok", value)
                except Exception as exc:  # the engine treats a failed step as a lost worker group
                    logger.exception("step channel: a request failed")
                    reply = ("error", f"{type(exc).__name__}: {exc}")
                try:
                    conn.send(reply)
                except OSError:
                    return

    def close(self) -> None:
        """Stops listening (a worker whose engine never connected)."""
        self._listener.close()


class StepChannel:
    """Engine side: sends each plan to every rank and reads their replies in the order the plans were sent."""

    def __init__(
        self, addresses: list[Address], authkey: bytes, timeout_s: float | None = None, output_rank: int = 0
    ) -> None:
        self._timeout_s = timeout_s  # how long a step may take before its workers count as lost
        self._output_rank = output_rank  # the rank whose reply is the step's output (the last pipeline stage's)
        self._conns: list[Connection] = []
        for address in addresses:
            try:
                conn = Client(address, authkey=authkey)
            except (OSError, AuthenticationError) as exc:
                self.close()
                raise WorkerGroupFailure(f"cannot connect to the worker at {address}: {exc}") from exc
            _no_delay(conn)
            self._conns.append(conn)
        self._sent = 0
        self._received = 0

    def send(self, plan: StepPlan | WorkerCall) -> int:
        """Sends `plan` to every rank; returns its sequence number, for `receive`."""
        payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)  # once, whatever the number of ranks
        try:
            for conn in self._conns:
                conn.send_bytes(payload)
        except OSError as exc:
            raise WorkerGroupFailure(f"a worker's step channel is closed: {exc}") from exc
        self._sent += 1
        return self._sent

    def receive(self, number: int) -> object:
        """The output rank's reply to message `number`, which must be the oldest not yet received. Replies are
        awaited from all ranks at once, so a rank that died is noticed even while the others block in a collective."""
        return self._receive_all(number)[self._output_rank]

    def call(self, method: str, *args: object) -> list[object]:
        """Every rank's result of `Worker.method(*args)`, run between steps (diagnostics and tests)."""
        return self._receive_all(self.send(WorkerCall((method, args))))

    def _receive_all(self, number: int) -> list[object]:
        if number != self._received + 1:
            raise RuntimeError(f"message {number} received out of order (expected {self._received + 1})")
        replies: list[object] = [None] * len(self._conns)
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        while pending:
            ready = wait(list(pending), timeout=self._timeout_s)
            if not ready:
                raise WorkerGroupFailure(f"worker rank(s) {sorted(pending.values())} did not answer within "
                                         f"{self._timeout_s:g}s (step_timeout_s): a hung collective or device?")
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError) as exc:
                    raise WorkerGroupFailure(f"worker rank {rank} closed its step channel (it died?): {exc!r}") from exc
                if status != "ok":
                    raise WorkerGroupFailure(f"worker rank {rank} failed: {value}")
                replies[rank] = value
        self._received = number
        return replies

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns = []
