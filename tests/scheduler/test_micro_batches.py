"""Micro-batches for pipeline stages: with several steps in flight, each holds sequences of its own, evenly.

A decoding sequence whose token is still being drawn cannot be stepped again (the first stage needs that token
as input); the engine keeps `micro_batches` steps in flight, so each step decodes its share of the sequences.
"""
from __future__ import annotations

from rayinfer.scheduler.block_manager import BlockManager
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.scheduler import Scheduler, SchedulerLimits
from rayinfer.scheduler.sequence import Request, Sequence, SequenceStatus


def _running(scheduler: Scheduler, bm: BlockManager, count: int, computed: int = 8) -> list[Sequence]:
    """`count` sequences decoding: `computed` prompt tokens in the pool and one drawn token to compute."""
    seqs = []
    for i in range(count):
        prompt = [100 + i] * computed
        request = Request(request_id=f"r{i}", prompt=None, prompt_token_ids=prompt,
                          params=SamplingParams(max_tokens=8), arrival=i, max_tokens=8,
                          stop_token_ids=frozenset(), eos_token_ids=frozenset())
        seq = Sequence(i, request, 0, 0, prompt + [7], computed)
        request.seqs.append(seq)
        bm.allocate(seq, computed)
        seq.num_computed_tokens = computed
        seq.status = SequenceStatus.RUNNING
        scheduler.running.append(seq)
        seqs.append(seq)
    return seqs


def _launch(scheduler: Scheduler, micro_batches: int) -> list[int]:
    """Schedules a step and books it as the engine does (its draws now in flight); returns its sequence ids."""
    out = scheduler.schedule(micro_batches)
    for scheduled in out.scheduled:
        scheduled.seq.num_computed_tokens += scheduled.num_new_tokens
        scheduled.seq.num_pending_tokens += 1
    return [s.seq.seq_id for s in out.scheduled]


def _land(scheduler: Scheduler, ids: list[int]) -> None:
    """The step's draws come back: each sequence gets its token."""
    for seq in scheduler.running:
        if seq.seq_id in ids:
            seq.token_ids.append(9)
            seq.num_pending_tokens -= 1


def test_steps_in_flight_hold_disjoint_even_shares() -> None:
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerLimits(256, 64, True), bm)
    _running(scheduler, bm, 5)
    first = _launch(scheduler, 2)
    second = _launch(scheduler, 2)
    assert first == [0, 1, 2] and second == [3, 4]  # ceil(5 / 2) then the rest
    assert _launch(scheduler, 2) == []  # everything is in flight: nothing may run again yet
    _land(scheduler, first)
    assert _launch(scheduler, 2) == first  # the first micro-batch goes again while the second is in flight
    _land(scheduler, second)
    assert _launch(scheduler, 2) == second


def test_one_micro_batch_steps_everything_as_before() -> None:
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerLimits(256, 64, True), bm)
    _running(scheduler, bm, 3)
    assert _launch(scheduler, 1) == [0, 1, 2]
    assert _launch(scheduler, 1) == [0, 1, 2]  # a token in flight is carried as pending (tensor-parallel GPUs)


def test_waiting_sequences_join_the_step_that_has_room() -> None:
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerLimits(256, 64, True), bm)
    _running(scheduler, bm, 2)
    request = Request(request_id="new", prompt=None, prompt_token_ids=[5] * 6, params=SamplingParams(max_tokens=4),
                      arrival=9, max_tokens=4, stop_token_ids=frozenset(), eos_token_ids=frozenset())
    newcomer = Sequence(9, request, 0, 0, [5] * 6, 6)
    request.seqs.append(newcomer)
    scheduler.add(newcomer)
    assert _launch(scheduler, 2) == [0, 9]  # its share of the decodes, then the prompt
    assert _launch(scheduler, 2) == [1]
