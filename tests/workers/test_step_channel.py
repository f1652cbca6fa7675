"""`StepChannel` / `StepServer`, without Ray: steps and calls answered in order, a peer without the key refused, a
failed step or a vanished worker surfacing as `WorkerGroupFailure`, and a pipelined step read in order."""
from __future__ import annotations

import threading
from multiprocessing.connection import AuthenticationError, Client, Listener

import pytest

from rayinfer.workers.executor_interface import WorkerGroupFailure
from rayinfer.workers.step_channel import StepChannel, StepServer
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan

KEY = b"k" * 32


class FakeWorker:
    """Draws token 100 + the number of chunks; a plan with `block_copies` set fails."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.steps = 0

    def execute(self, plan: StepPlan) -> StepOutput | None:
        if plan.block_copies:
            raise RuntimeError("cannot copy blocks")
        self.steps += 1
        return StepOutput([100 + self.steps]) if self.rank == 0 else None

    def call(self, method: str, args: tuple) -> object:
        return getattr(self, method)(*args)

    def num_steps(self, plus: int) -> int:
        return self.steps + plus


def _serve(workers: list[FakeWorker], key: bytes = KEY) -> tuple[list[StepServer], list[threading.Thread]]:
    servers = [StepServer("127.0.0.1", key) for _ in workers]
    threads = [
        threading.Thread(target=server.serve, args=(worker.execute, worker.call), daemon=True)
        for server, worker in zip(servers, workers)
    ]
    for thread in threads:
        thread.start()
    return servers, threads


def _plan(**fields: object) -> StepPlan:
    return StepPlan(chunks=[], **fields)


def test_steps_and_calls_are_answered_in_order_by_every_rank() -> None:
    workers = [FakeWorker(0), FakeWorker(1)]
    servers, threads = _serve(workers)
    channel = StepChannel([s.address for s in servers], KEY)
    first, second = channel.send(_plan()), channel.send(_plan())  # pipelined: two in flight
    assert channel.receive(first).token_ids == [101]
    assert channel.receive(second).token_ids == [102]
    assert channel.call("num_steps", 10) == [12, 12]
    with pytest.raises(RuntimeError, match="out of order"):
        channel.receive(channel.send(_plan()) + 1)
    channel.close()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()  # closing the channel ends the workers' loops


def test_a_peer_without_the_key_is_refused_and_the_engine_still_connects() -> None:
    worker = FakeWorker(0)
    servers, _ = _serve([worker])
    with pytest.raises(AuthenticationError):
        Client(servers[0].address, authkey=b"wrong" * 7)
    channel = StepChannel([servers[0].address], KEY)
    assert channel.receive(channel.send(_plan())).token_ids == [101]
    channel.close()


def test_a_failed_step_is_a_worker_group_failure() -> None:
    servers, _ = _serve([FakeWorker(0)])
    channel = StepChannel([servers[0].address], KEY)
    with pytest.raises(WorkerGroupFailure, match="rank 0 failed: RuntimeError: cannot copy blocks"):
        channel.receive(channel.send(_plan(block_copies=[(1, 2)])))
    channel.close()


def test_a_worker_that_goes_away_is_a_worker_group_failure() -> None:
    listener = Listener(("127.0.0.1", 0), authkey=KEY)

    def vanishing_rank() -> None:  # takes the step, then closes its end, as a process that died does
        with listener.accept() as conn:
            conn.recv_bytes()
        listener.close()

    threading.Thread(target=vanishing_rank, daemon=True).start()
    servers, _ = _serve([FakeWorker(0)])
    channel = StepChannel([servers[0].address, listener.address], KEY)
    with pytest.raises(WorkerGroupFailure, match="rank 1 closed its step channel"):
        channel.receive(channel.send(_plan()))
    channel.close()


def test_an_unreachable_worker_is_a_worker_group_failure() -> None:
    server = StepServer("127.0.0.1", KEY)
    address = server.address
    server.close()  # nobody listens there any more
    with pytest.raises(WorkerGroupFailure, match="cannot connect"):
        StepChannel([address], KEY)


def test_a_rank_that_does_not_answer_in_time_is_a_worker_group_failure() -> None:
    """A hung collective: rank 1 never answers; the step fails after step_timeout_s instead of waiting forever."""
    release = threading.Event()

    class HungWorker(FakeWorker):
        def execute(self, plan: StepPlan) -> StepOutput | None:
            release.wait(30)
            return super().execute(plan)

    servers, _ = _serve([FakeWorker(0), HungWorker(1)])
    channel = StepChannel([s.address for s in servers], KEY, timeout_s=1.0)
    try:  # (rank 0 answers at once, but on a loaded machine it might not within the second)
        with pytest.raises(WorkerGroupFailure, match=r"rank\(s\) \[(0, )?1\] did not answer within 1s"):
            channel.receive(channel.send(_plan()))
    finally:
        release.set()
        channel.close()
