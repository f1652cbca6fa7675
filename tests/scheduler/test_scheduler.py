"""Scheduler on hand-made requests, no model: budget packing, FCFS admission, limits, preemption, progress."""

from __future__ import annotations

import itertools
import random

import pytest

from rayinfer.scheduler.block_manager import BlockManager, blocks_for
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from rayinfer.scheduler.sequence import Request, Sequence, SequenceStatus


class Harness:
    """A scheduler plus the engine's bookkeeping, done by hand: compute what was scheduled, sample, finish."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 4,
        budget: int = 64,
        max_num_seqs: int = 256,
        chunked: bool = True,
        watermark: float = 0.0,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, watermark=watermark)
        self.sched = Scheduler(SchedulerLimits(max_num_seqs, budget, chunked), self.bm)
        self._ids = itertools.count()
        self.seqs: list[Sequence] = []
        self.finished: list[Sequence] = []

    def add(self, prompt_len: int, max_tokens: int = 4) -> Sequence:
        seq_id = next(self._ids)
        prompt = [100 + (seq_id * 31 + i) % 300 for i in range(prompt_len)]
        request = Request(
            request_id=f"r{seq_id}",
            prompt=None,
            prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=max_tokens),
            arrival=seq_id,
            max_tokens=max_tokens,
            stop_token_ids=frozenset(),
            eos_token_ids=frozenset(),
        )
        seq = Sequence(seq_id, request, 0, 0, list(prompt), prompt_len)
        request.seqs.append(seq)
        self.sched.add(seq)
        self.seqs.append(seq)
        return seq

    def place_running(self, seq: Sequence, num_computed: int) -> None:
        """Puts a waiting sequence straight into the running set with `num_computed` tokens already in the pool."""
        self.sched.waiting.remove(seq)
        self.bm.allocate(seq, num_computed)
        seq.num_computed_tokens = num_computed
        seq.status = SequenceStatus.RUNNING
        self.sched.running.append(seq)
        self.sched.running.sort(key=lambda s: s.arrival)

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.check(out)
        self.apply(out)
        return out

    def apply(self, out: SchedulerOutput) -> None:
        """What the engine does after the forward: count the computed tokens, append samples, finish at max_tokens."""
        for scheduled in out.scheduled:
            seq = scheduled.seq
            seq.num_computed_tokens += scheduled.num_new_tokens
            if scheduled.samples:
                seq.append_token(7 + len(seq.token_ids))
                if len(seq.output_token_ids) >= seq.request.max_tokens:
                    self.sched.finish(seq)
                    self.finished.append(seq)

    def check(self, out: SchedulerOutput) -> None:
        limits = self.sched.limits
        assert out.num_batched_tokens <= limits.max_num_batched_tokens
        assert len(self.sched.running) <= limits.max_num_seqs
        ids = [s.seq.seq_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
        for scheduled in out.scheduled:
            seq = scheduled.seq
            assert scheduled.num_new_tokens >= 1
            assert seq.status is SequenceStatus.RUNNING and seq in self.sched.running
            assert scheduled.num_new_tokens <= seq.num_uncomputed_tokens
            assert scheduled.samples == (scheduled.num_new_tokens == seq.num_uncomputed_tokens)
            covered = seq.num_computed_tokens + scheduled.num_new_tokens
            assert len(seq.block_table) == blocks_for(covered, self.bm.block_size)
            if not limits.enable_chunked_prefill:
                assert scheduled.samples, "without chunked prefill a prompt runs whole or not at all"
        partial = [s for s in out.scheduled if not s.samples]
        if partial:  # a prompt is only cut where the budget runs out: one cut per step, at the end of the batch
            assert partial == [out.scheduled[-1]]
            assert out.num_batched_tokens == limits.max_num_batched_tokens or out.preempted
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq in self.sched.waiting
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        for seq in self.sched.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        arrivals = [s.arrival for s in self.sched.running]
        assert arrivals == sorted(arrivals)
        held = [b for s in self.sched.running for b in s.block_table]
        assert len(held) == len(set(held))
        assert len(held) + self.bm.num_free_blocks == self.bm.num_blocks

    def run(self, max_steps: int) -> int:
        for step in range(1, max_steps + 1):
            out = self.step()
            if not self.sched.has_work():
                return step
            assert not out.is_empty, "no progress with work pending"
        raise AssertionError(f"not done after {max_steps} steps")


def scheduled_map(out: SchedulerOutput) -> dict[int, int]:
    return {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}


# ---------------------------------------------------------------- ordering and packing


def test_decodes_are_scheduled_before_prompt_chunks() -> None:
    h = Harness(num_blocks=64, budget=8)
    a = h.add(3, max_tokens=10)
    b = h.add(20)
    out = h.step()
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(a, 3, True), (b, 5, False)]
    out = h.step()
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(a, 1, True), (b, 7, False)]
    out = h.step()
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(a, 1, True), (b, 7, False)]
    out = h.step()  # b's prompt ends (5 + 7 + 7 + 1 = 20): it samples
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(a, 1, True), (b, 1, True)]


def test_a_newer_decode_goes_before_an_older_prompt_chunk() -> None:
    h = Harness(num_blocks=64, budget=6)
    old = h.add(30)
    new = h.add(3)
    h.place_running(old, 10)  # mid-prompt
    h.place_running(new, 3)
    new.append_token(9)  # sampled its first token: decoding
    out = h.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(new, 1), (old, 5)]
    # With a budget of one token the decode takes it all.
    h2 = Harness(num_blocks=64, budget=1)
    old2, new2 = h2.add(30), h2.add(3)
    h2.place_running(old2, 10)
    h2.place_running(new2, 3)
    new2.append_token(9)
    assert [(s.seq, s.num_new_tokens) for s in h2.step().scheduled] == [(new2, 1)]


def test_long_prompt_is_split_under_the_budget_and_short_prompts_packed_with_it() -> None:
    h = Harness(num_blocks=64, budget=16)
    long = h.add(40)
    shorts = [h.add(3) for _ in range(3)]
    chunks = []
    for _ in range(3):
        out = h.step()
        assert out.num_batched_tokens == 16  # the budget is filled every step
        chunks.append(scheduled_map(out))
    assert [c[long.seq_id] for c in chunks] == [16, 16, 8]
    assert len(chunks[0]) == len(chunks[1]) == 1  # the long prompt's chunks leave no room before the last
    # The last chunk of the long prompt shares its step with the short prompts (the third one split: 2 of 3).
    assert chunks[2] == {long.seq_id: 8, shorts[0].seq_id: 3, shorts[1].seq_id: 3, shorts[2].seq_id: 2}
    assert long.num_computed_tokens == 40 and len(long.output_token_ids) == 1


def test_short_prompts_pack_into_one_step_ahead_of_a_long_one() -> None:
    h = Harness(num_blocks=64, budget=16)
    shorts = [h.add(n) for n in (2, 3, 4)]
    long = h.add(30)
    out = h.step()
    assert scheduled_map(out) == {shorts[0].seq_id: 2, shorts[1].seq_id: 3, shorts[2].seq_id: 4, long.seq_id: 7}
    assert [s.samples for s in out.scheduled] == [True, True, True, False]
    out = h.step()  # three decodes first, then 13 more of the long prompt
    assert scheduled_map(out) == {shorts[0].seq_id: 1, shorts[1].seq_id: 1, shorts[2].seq_id: 1, long.seq_id: 13}


# ---------------------------------------------------------------- admission


def test_admission_is_first_come_first_served_without_skipping() -> None:
    # The head of the queue needs more blocks than are free: nothing behind it jumps ahead, even if it fits.
    h = Harness(num_blocks=10, block_size=4, budget=64)
    a = h.add(28, max_tokens=2)  # 7 blocks
    out = h.step()
    assert scheduled_map(out) == {a.seq_id: 28}
    b = h.add(16)  # 4 blocks: does not fit in the 2 free (a needs one more for its decode)
    c = h.add(1)  # 1 block: would fit
    out = h.step()
    assert scheduled_map(out) == {a.seq_id: 1}
    assert list(h.sched.waiting) == [b, c]
    out = h.step()  # a is done; b and c are admitted in arrival order
    assert a.is_finished
    assert [s.seq for s in out.scheduled] == [b, c]


def test_admission_order_is_arrival_order() -> None:
    h = Harness(num_blocks=100, budget=7)
    seqs = [h.add(3) for _ in range(6)]
    admitted: list[Sequence] = []
    for _ in range(10):
        out = h.step()
        admitted += [s.seq for s in out.scheduled if s.seq not in admitted]  # first appearance = admission
        if len(admitted) == len(seqs):
            break
    assert admitted == seqs


def test_max_num_seqs_is_respected() -> None:
    h = Harness(num_blocks=200, budget=64, max_num_seqs=3)
    seqs = [h.add(5, max_tokens=3) for _ in range(10)]
    out = h.step()
    assert [s.seq for s in out.scheduled] == seqs[:3]
    assert len(h.sched.running) == 3 and len(h.sched.waiting) == 7
    peak = 0
    while h.sched.has_work():
        out = h.step()
        peak = max(peak, len(out.scheduled), len(h.sched.running))
    assert peak == 3
    assert h.finished == seqs  # equal lengths: they finish in arrival order, three at a time


def test_without_chunked_prefill_a_prompt_is_scheduled_whole_or_not_at_all() -> None:
    h = Harness(num_blocks=100, budget=20, chunked=False)
    a = h.add(3, max_tokens=5)
    h.step()
    b = h.add(20)  # exactly the budget: cannot share a step with a's decode
    c = h.add(2)  # fits the leftover budget but is behind b
    out = h.step()
    assert scheduled_map(out) == {a.seq_id: 1}
    for _ in range(3):
        assert scheduled_map(h.step()) == {a.seq_id: 1}
    assert a.is_finished
    out = h.step()
    assert scheduled_map(out) == {b.seq_id: 20}  # whole, alone; c (2 tokens) waits for the next step
    out = h.step()
    assert scheduled_map(out) == {b.seq_id: 1, c.seq_id: 2}


@pytest.mark.parametrize("seed", range(6))
def test_without_chunked_prefill_random_runs_never_split_a_prompt(seed: int) -> None:
    rng = random.Random(seed)
    # Without chunking the budget must cover the longest text (the engine makes it >= max_model_len), since a
    # preempted sequence is recomputed whole: prompt plus everything it generated.
    h = Harness(num_blocks=40, block_size=4, budget=100, chunked=False, max_num_seqs=rng.randint(1, 8))
    for _ in range(15):
        prompt = rng.randint(1, 99)
        h.add(prompt, max_tokens=rng.randint(1, 100 - prompt))
    h.run(max_steps=5000)  # Harness.check asserts every scheduled sequence samples
    assert len(h.finished) == 15 and h.bm.num_free_blocks == 40


# ---------------------------------------------------------------- watermark


def test_watermark_holds_back_admission_while_others_run() -> None:
    h = Harness(num_blocks=100, block_size=1, budget=200, watermark=0.1)  # 10 blocks of watermark
    a = h.add(50, max_tokens=30)
    h.step()
    b = h.add(41)  # 41 blocks: a holds 50 + 1 for its next token, leaving 49 free; 49 - 41 < 10
    out = h.step()
    assert [s.seq for s in out.scheduled] == [a]
    assert list(h.sched.waiting) == [b]
    # The running sequence itself is not held to the watermark: it grows into it.
    h.run(max_steps=200)
    assert len(h.finished) == 2 and h.bm.num_free_blocks == 100


@pytest.mark.parametrize("chunked", [True, False])
def test_a_sequence_larger_than_pool_minus_watermark_is_admitted_when_nothing_runs(chunked: bool) -> None:
    # 199 of 200 blocks fits the pool; the watermark (2 blocks) only protects running sequences, and there are none.
    h = Harness(num_blocks=200, block_size=1, budget=300, chunked=chunked, watermark=0.01)
    seq = h.add(199, max_tokens=1)
    assert h.run(max_steps=3) == 1
    assert seq.is_finished and h.bm.num_free_blocks == 200


def test_a_preempted_sequence_larger_than_pool_minus_watermark_is_readmitted() -> None:
    h = Harness(num_blocks=200, block_size=1, budget=300, chunked=False, watermark=0.01)
    seq = h.add(150, max_tokens=50)
    for i in range(49):  # as if it had generated 49 tokens and then been preempted: 199 tokens to recompute
        seq.append_token(200 + i)
    out = h.step()
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(seq, 199, True)]
    assert seq.is_finished and len(seq.output_token_ids) == 50 and h.bm.num_free_blocks == 200


# ---------------------------------------------------------------- preemption


def test_newest_running_sequence_is_preempted_for_recompute() -> None:
    h = Harness(num_blocks=6, block_size=4, budget=64, max_num_seqs=3)
    a, b, c = h.add(8, max_tokens=8), h.add(8, max_tokens=8), h.add(8, max_tokens=8)
    d = h.add(2)  # held back by max_num_seqs
    out = h.step()
    assert [s.seq for s in out.scheduled] == [a, b, c] and h.bm.num_free_blocks == 0
    c_text = list(c.token_ids)
    assert len(c_text) == 9 and c.output_token_ids == c_text[8:]
    out = h.step()  # a and b each need a third block; c goes to make room
    assert out.preempted == [c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert h.sched.num_preemptions == 1
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.token_ids == c_text and c.output_token_ids == c_text[8:]  # its text is kept, to recompute
    assert list(h.sched.waiting) == [c, d]  # back in front, in arrival order
    assert h.sched.running == [a, b]
    # Later it is recomputed whole (prompt plus its sampled token) and samples at the end of that chunk.
    while c.num_computed_tokens == 0:
        out = h.step()
    recompute = next(s for s in out.scheduled if s.seq is c)
    assert recompute.num_new_tokens == 9 and recompute.samples
    h.run(max_steps=200)
    assert {s.seq_id for s in h.finished} == {a.seq_id, b.seq_id, c.seq_id, d.seq_id}


def test_two_victims_in_one_step_go_back_in_arrival_order_and_are_unscheduled() -> None:
    h = Harness(num_blocks=5, block_size=4, budget=64)
    a, b, c, d = h.add(20, max_tokens=1), h.add(3), h.add(3), h.add(2)
    h.place_running(a, 8)  # 2 blocks, mid-prompt
    h.place_running(b, 3)  # 1 block, decoding
    b.append_token(9)
    h.place_running(c, 3)  # 1 block, decoding
    c.append_token(9)
    assert h.bm.num_free_blocks == 1
    out = h.sched.schedule()  # b and c are scheduled first, then a needs 3 more blocks: c, then b, must go
    h.check(out)
    assert out.preempted == [c, b]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 12)]
    assert list(h.sched.waiting) == [b, c, d]  # nothing admitted in a step that preempted
    assert h.sched.running == [a] and h.bm.num_free_blocks == 0
    assert h.sched.num_preemptions == 2
    h.apply(out)
    h.run(max_steps=100)
    assert len(h.finished) == 4 and h.bm.num_free_blocks == 5


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    h = Harness(num_blocks=4, block_size=4, budget=64)
    a, b = h.add(3), h.add(3)
    h.place_running(a, 3)
    a.append_token(9)  # 4 tokens, block full after this decode
    h.place_running(b, 3)
    b.append_token(9)
    a.append_token(9)  # a now needs a second block for its decode
    a.num_computed_tokens = 4
    b_blocks = list(b.block_table)
    h.bm.allocate(h.add(8), 8)  # a stranger holds the remaining 2 blocks: no room for anyone new
    assert h.bm.num_free_blocks == 0
    out = h.sched.schedule()
    assert out.preempted == [b]  # a (older) takes b's block; b is not scheduled
    assert [s.seq for s in out.scheduled] == [a]
    assert a.block_table[-1] in b_blocks


@pytest.mark.parametrize("seed", range(8))
def test_oldest_running_sequence_always_progresses_and_is_never_preempted(seed: int) -> None:
    rng = random.Random(100 + seed)
    block_size = rng.choice([1, 4, 16])
    max_len = 60
    h = Harness(
        num_blocks=blocks_for(max_len, block_size),  # room for one longest sequence only
        block_size=block_size,
        budget=rng.randint(1, 32),
        chunked=True,
    )
    for _ in range(12):
        prompt = rng.randint(1, 40)
        h.add(prompt, max_tokens=rng.randint(1, max_len - prompt))
    for _ in range(20000):
        if not h.sched.has_work():
            break
        oldest = h.sched.running[0] if h.sched.running else None
        decoders = sum(s.num_uncomputed_tokens == 1 for s in h.sched.running)
        out = h.step()
        if oldest is not None:
            assert oldest not in out.preempted
            if decoders < h.sched.limits.max_num_batched_tokens:
                assert oldest in [s.seq for s in out.scheduled]
    assert not h.sched.has_work()
    assert len(h.finished) == 12 and h.bm.num_free_blocks == h.bm.num_blocks
    assert h.sched.num_preemptions > 0


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("chunked", [True, False])
def test_no_deadlock_with_a_tiny_pool(block_size: int, chunked: bool) -> None:
    for seed in range(4):
        rng = random.Random(seed * 7 + block_size)
        max_len = 48
        budget = rng.randint(1, 64) if chunked else rng.randint(max_len, max_len + 16)
        h = Harness(
            num_blocks=blocks_for(max_len, block_size) + rng.randint(0, 1),
            block_size=block_size,
            budget=budget,
            max_num_seqs=rng.randint(1, 10),
            chunked=chunked,
        )
        total_tokens = 0
        for _ in range(15):
            prompt = rng.randint(1, 30)
            max_tokens = rng.randint(1, max_len - prompt)
            h.add(prompt, max_tokens=max_tokens)
            total_tokens += prompt + max_tokens
        # Generous but finite: every step moves the oldest sequence on, and a preemption costs at most one rerun.
        h.run(max_steps=20 * total_tokens)
        assert len(h.finished) == 15
        assert all(len(s.output_token_ids) == s.request.max_tokens for s in h.finished)
        assert h.bm.num_free_blocks == h.bm.num_blocks
        assert not h.sched.running and not h.sched.waiting


def test_finish_releases_a_sequence_wherever_it_is() -> None:
    h = Harness(num_blocks=20, budget=5)
    running, waiting = h.add(12), h.add(3)
    h.step()  # running takes the whole budget with a 5-token chunk
    assert running.block_table and waiting in h.sched.waiting
    h.sched.finish(running)
    h.sched.finish(waiting)
    assert running.is_finished and waiting.is_finished
    assert not h.sched.has_work() and h.bm.num_free_blocks == 20
    assert h.sched.schedule().is_empty
