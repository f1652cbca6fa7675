"""The real Engine over a fake executor: random workloads under a small KV pool, checking every step's plan.

The fake executor stands in for the model. On every step it checks what a worker relies on: the plan fits the
token budget, each chunk's block table covers its tokens, no block a step writes is in another sequence's table
(blocks are shared only for reading: a request's sequences share their prompt, prefix caching shares common
prefixes, and a shared block is copied before it is written), the pool is never over-used, and the tokens each
chunk feeds are exactly the sequence's text (recomputed after a preemption, continued where it stopped
otherwise). It keeps a model of the KV pool, one token id per slot, and checks that every position a chunk
attends to holds its sequence's token: what shared and cached blocks are reused for must be right. It answers
with a token derived from (seq_id, position), so the final outputs can be checked token by token.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.block_manager import blocks_for
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.outputs import OutputAssembler, RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.workers.step_plan import StepPlan
from rayinfer.workers.executor_interface import Executor
from rayinfer.scheduler.sequence import PENDING_TOKEN
from rayinfer.workers.worker import SequenceStates

MAX_MODEL_LEN = 160
FIRST_PLAIN_ID = 6  # the tiny tokenizer's ids 0..5 are special: BOS, EOS, PAD and the chat role tokens
VOCAB = 512


def fake_token(seq_id: int, position: int) -> int:
    """The token the fake model 'samples' for position `position` of sequence `seq_id`: never EOS or special."""
    return FIRST_PLAIN_ID + (seq_id * 7919 + position * 104729 + 12345) % (VOCAB - FIRST_PLAIN_ID)


class FakeExecutor(Executor):
    """Checks each StepPlan against the engine's state and returns deterministic tokens."""

    def __init__(
        self,
        config: EngineConfig,
        spec: object,
        max_model_len: int,
        max_num_batched_tokens: int,
        engine_id: str,
        num_blocks: int = 8,
        pipelined: bool = False,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_blocks = num_blocks
        # Pipelined: steps are only queued on submit and run when their result is asked for, as a worker
        # actor runs them in order after the engine has already planned the next (with pending tokens).
        self.pipelined = pipelined
        self.num_pending_inputs = 0  # inputs planned before the token they stand for was drawn
        self.engine: Engine | None = None  # set after construction, for checks on sequences not in the plan
        self.known: dict[int, list[int]] = {}  # seq_id -> every token of its text seen so far (fed or sampled)
        self.states = SequenceStates()  # rebuilt from the plans' deltas alone, as a worker does
        self.pool: list[list[int | None]] = [[None] * self.block_size for _ in range(num_blocks)]  # token per slot
        self.num_copies = 0
        self.num_steps = 0
        self.num_recomputes = 0
        self.max_blocks_in_use = 0

    def submit(self, plan: StepPlan) -> object:
        return plan if self.pipelined else self.execute(plan)

    def result(self, handle: object) -> list[int]:
        return self.execute(handle) if self.pipelined else handle

    def execute(self, plan: StepPlan) -> list[int]:
        if not plan.chunks:  # a flush: nothing runs, the workers only drop ended sequences
            assert plan.finished_seq_ids and not plan.new_sequences, "an empty plan with nothing to flush"
            assert not self.engine.scheduler.has_work(), "a flush was sent while there was work"
            self.states.apply(plan)
            return []
        self.num_steps += 1
        assert plan.num_tokens <= self.max_num_batched_tokens
        seq_ids = [chunk.seq_id for chunk in plan.chunks]
        assert len(seq_ids) == len(set(seq_ids)), "a sequence appears twice in one step"
        blocks_in_plan: set[int] = set()
        tokens = []
        self.num_pending_inputs += sum(chunk.token_ids.count(PENDING_TOKEN) for chunk in plan.chunks)
        self.states.apply(plan)
        for src, dst in plan.block_copies:  # before the forward, as the workers do
            self.pool[dst] = list(self.pool[src])
        self.num_copies += len(plan.block_copies)
        tables = {chunk.seq_id: self.states[chunk.seq_id].block_table for chunk in plan.chunks}
        for chunk in plan.chunks:
            n = len(chunk.token_ids)
            assert n >= 1
            end = chunk.start_position + n
            assert end <= self.max_model_len
            state = self.states[chunk.seq_id]
            table = state.block_table
            assert len(table) * self.block_size >= end, "the block table does not cover the chunk's tokens"
            assert len(table) == blocks_for(end, self.block_size), "the block table holds blocks it does not need"
            assert all(0 <= block < self.num_blocks for block in table)
            assert len(set(table)) == len(table)
            # Another sequence of the step may read a block this one fills (a prefix cached as it is computed:
            # each layer writes the step's K/V before attending), but no two write the same slot.
            written = {(table[p // self.block_size], p % self.block_size) for p in range(chunk.start_position, end)}
            assert not written & blocks_in_plan, "two sequences in one step write the same KV slot"
            blocks_in_plan |= written
            if not self.config.enable_chunked_prefill:
                # The one split allowed: a request's first sequence stops before its prompt's last token, where
                # its siblings fork from it.
                fork_point = end == state.num_prompt_tokens - 1
                assert chunk.sample or fork_point, "a prompt was split although chunked prefill is off"
            self._check_text(chunk.seq_id, chunk.start_position, chunk.token_ids, state)
            self._write_pool(chunk.start_position, chunk.token_ids, table)
            if chunk.sample:
                known = self.known[chunk.seq_id]
                assert end == len(known), "a chunk samples while some of its sequence's tokens are not computed"
                assert state.sampling.prompt_token_ids == known[: state.num_prompt_tokens]
                assert state.sampling.output_token_ids == known[state.num_prompt_tokens :]
                token = fake_token(chunk.seq_id, end)
                known.append(token)
                tokens.append(token)
        for chunk in plan.chunks:  # every layer writes the whole step's K/V, then attends
            self._check_pool(chunk.seq_id, chunk.start_position + len(chunk.token_ids), tables[chunk.seq_id])
        self.states.record_samples(plan, tokens)
        if self.engine is not None and not self.pipelined:  # a pipelined engine has moved on since submitting
            self._check_live_sequences(set(seq_ids))
        return tokens

    def _check_text(self, seq_id: int, start: int, token_ids: list[int], state) -> None:
        num_prompt_tokens = state.num_prompt_tokens
        known = self.known.setdefault(seq_id, [])
        if start > len(known):
            # It starts past what it fed on blocks it did not write (a sibling's prompt, or cached blocks): their
            # tokens are its text's, which the pool check below verifies the blocks hold.
            text = state.sampling.prompt_token_ids + state.sampling.output_token_ids
            known.extend(text[len(known) : start])
        if start + 1 < len(known) and len(known) > num_prompt_tokens:
            # A preempted sequence starts over (from 0, or where the prefix cache ends): it must feed the same text
            # again. (A decode re-feeds only the one token it last drew.)
            self.num_recomputes += 1
        assert start <= len(known), "a chunk skips tokens that were never fed"
        overlap = known[start : start + len(token_ids)]
        assert token_ids[: len(overlap)] == overlap, "a chunk feeds tokens that differ from the sequence's text"
        known.extend(token_ids[len(overlap) :])

    def _write_pool(self, start: int, token_ids: list[int], table: list[int]) -> None:
        for offset, token in enumerate(token_ids):
            position = start + offset
            self.pool[table[position // self.block_size]][position % self.block_size] = token

    def _check_pool(self, seq_id: int, end: int, table: list[int]) -> None:
        size = self.block_size
        stored = [self.pool[table[p // size]][p % size] for p in range(end)]
        assert stored == self.known[seq_id][:end], "a chunk attends to KV slots that do not hold its sequence's tokens"

    def _check_live_sequences(self, scheduled_ids: set[int]) -> None:
        engine = self.engine
        running = engine.scheduler.running
        held = [block for seq in running for block in seq.block_table]
        for seq in running:
            if seq.seq_id in scheduled_ids:
                assert self.states[seq.seq_id].block_table == seq.block_table, "worker tables drifted from the engine's"
        assert set(self.states) <= {s.seq_id for r in engine.requests.values() for s in r.seqs}, "workers keep dead sequences"
        for block in set(held):
            assert engine.block_manager.ref_count(block) == held.count(block), "a block's reference count is off"
        assert len(set(held)) + engine.num_free_blocks == self.num_blocks, "blocks leaked or double-counted"
        assert all(not seq.block_table for seq in engine.scheduler.waiting), "a waiting sequence holds blocks"
        assert scheduled_ids <= {seq.seq_id for seq in running}
        assert len(running) <= engine.config.max_num_seqs
        self.max_blocks_in_use = max(self.max_blocks_in_use, len(set(held)))


def make_engine(model_dir: Path, num_blocks: int, pipelined: bool = False, **config: object) -> Engine:
    engine = Engine(
        EngineConfig(model=str(model_dir), max_model_len=MAX_MODEL_LEN, **config),
        executor_factory=functools.partial(FakeExecutor, num_blocks=num_blocks, pipelined=pipelined),
    )
    engine.executor.engine = engine
    return engine


def drain(engine: Engine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Steps to the end; each request's whole output, assembled from its deltas."""
    finals, assembler = {}, OutputAssembler()
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            assert not engine.executor.states, "workers still hold sequences after every request ended"
            return finals
        for delta in engine.step():
            if (output := assembler.add(delta)) is not None:
                finals[output.request_id] = output
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def _assemble(so_far: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Adds a delta to its request's output so far; only a request's first delta carries its prompt ids."""
    out = so_far.get(delta.request_id)
    assert (delta.prompt_token_ids is not None) == (out is None), "the prompt ids travel once, in the first delta"
    if out is None:
        out = so_far[delta.request_id] = RequestOutput(delta.request_id, delta.prompt, list(delta.prompt_token_ids))
    out.add(delta)
    return out


# ---------------------------------------------------------------- random workloads


def run_workload(
    model_dir: Path,
    seed: int,
    block_size: int,
    chunked: bool,
    small_pool: bool,
    pipelined: bool = False,
    prefix_caching: bool = False,
) -> Engine:
    rng = random.Random(seed)
    budget = rng.randint(1, 64) if chunked else rng.randint(MAX_MODEL_LEN, MAX_MODEL_LEN + 40)
    longest = blocks_for(MAX_MODEL_LEN, block_size)  # the most any request here can need (prompt + max_tokens <= 160)
    num_blocks = longest + rng.randint(0, 2) if small_pool else 8 * longest
    engine = make_engine(
        model_dir,
        num_blocks,
        pipelined=pipelined,
        block_size=block_size,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        max_num_seqs=rng.randint(4, 16),
        seed=seed,
        enable_prefix_caching=prefix_caching,
    )
    executor: FakeExecutor = engine.executor

    num_requests = rng.randint(20, 30)
    # Some prompts start with one of a few shared prefixes, so the prefix cache has something to find.
    prefixes = [[rng.randrange(FIRST_PLAIN_ID, VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(3)]
    specs = []
    for i in range(num_requests):
        prompt = rng.choice(prefixes)[:] if rng.random() < 0.5 else []
        prompt = (prompt + [rng.randrange(FIRST_PLAIN_ID, VOCAB) for _ in range(rng.randint(1, 100))])[:110]
        room = MAX_MODEL_LEN - len(prompt)
        max_tokens = None if rng.random() < 0.1 else rng.randint(1, min(room, 60))
        n = rng.choice([2, 3]) if rng.random() < 0.25 else 1
        specs.append((f"req-{seed}-{i}", prompt, max_tokens, n))
    pending = list(specs)
    expected: dict[str, tuple[int, list[int], list[int]]] = {}  # request_id -> (max_tokens, prompt, seq_ids)

    def add_next() -> None:
        request_id, prompt, max_tokens, n = pending.pop(0)
        params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.0)
        engine.add_request(request_id, None, params, prompt_token_ids=prompt)
        seq_ids = [seq.seq_id for seq in engine.requests[request_id].seqs]
        expected[request_id] = (max_tokens or MAX_MODEL_LEN - len(prompt), prompt, seq_ids)

    for _ in range(rng.randint(1, len(pending))):
        add_next()

    finals: dict[str, RequestOutput] = {}
    aborted: dict[str, RequestOutput] = {}
    last_seen: dict[str, RequestOutput] = {}
    total_tokens = sum(len(p) + (m or MAX_MODEL_LEN - len(p)) * n for _, p, m, n in specs)
    max_steps = 10 * total_tokens  # finite: every step moves the oldest sequence on
    for _ in range(max_steps):
        if pending and rng.random() < 0.1:
            add_next()  # arrives while others run
        if engine.requests and rng.random() < 0.01:
            victim = rng.choice(sorted(engine.requests))
            delta = engine.abort_request(victim)
            assert delta is not None and delta.finished
            out = _assemble(last_seen, delta)  # the abort ends what was generated up to now
            assert all(c.finish_reason in ("abort", "length") for c in out.outputs)
            assert any(c.finish_reason == "abort" for c in out.outputs)
            aborted[victim] = out
        if not engine.has_unfinished_requests():
            if not pending:
                break
            add_next()
        for delta in engine.step():
            out = _assemble(last_seen, delta)
            if out.finished:
                finals[out.request_id] = out
    else:
        raise AssertionError(f"workload not done after {max_steps} steps")

    assert not pending and not engine.has_unfinished_requests()
    assert set(finals) | set(aborted) == set(expected) and not set(finals) & set(aborted)
    for request_id, (max_tokens, prompt, seq_ids) in expected.items():
        out = finals.get(request_id) or aborted[request_id]
        assert out.prompt_token_ids == prompt and out.error is None
        assert [c.index for c in out.outputs] == list(range(len(seq_ids)))
        for completion, seq_id in zip(out.outputs, seq_ids, strict=True):
            want = [fake_token(seq_id, len(prompt) + k) for k in range(max_tokens)]
            if request_id in finals:
                assert completion.finish_reason == "length"
                assert completion.token_ids == want
            else:  # aborted: whatever it had generated, and no more
                assert completion.token_ids == want[: len(completion.token_ids)]
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert executor.max_blocks_in_use <= num_blocks
    return engine


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["in-order", "pipelined"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompts"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_random_workloads_on_a_small_pool(
    llama_dir: Path, block_size: int, chunked: bool, pipelined: bool, prefix_caching: bool
) -> None:
    hits = copies = 0
    for seed in range(8):
        engine = run_workload(
            llama_dir, 1000 * block_size + 10 * seed + chunked, block_size, chunked, small_pool=True,
            pipelined=pipelined, prefix_caching=prefix_caching,
        )
        hits += engine.block_manager.num_prefix_hits
        copies += engine.executor.num_copies
        preemptions = engine.scheduler.num_preemptions
        assert (engine.executor.num_pending_inputs > 0) == pipelined
        if engine.max_num_batched_tokens > 1:
            # The pool holds one longest request; 20+ requests cannot all fit, so some were preempted, and each
            # was recomputed from its text, which the executor checked token by token.
            assert preemptions > 0, f"seed {seed}: a small pool should force preemption"
            assert engine.executor.num_recomputes > 0
        else:
            assert preemptions == 0  # a one-token budget runs one sequence at a time: nothing to preempt
    assert (hits > 0) == prefix_caching  # shared prefixes and recomputed texts were found in the cache
    if block_size > 1:
        assert copies > 0  # forked prompts ending mid-block were copied before their siblings wrote them


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompts"])
def test_random_workloads_on_a_roomy_pool(llama_dir: Path, chunked: bool) -> None:
    for seed, block_size in enumerate([1, 4, 16]):
        run_workload(llama_dir, 77 + seed, block_size, chunked, small_pool=False)
        run_workload(llama_dir, 177 + seed, block_size, chunked, small_pool=False, prefix_caching=True)


# ---------------------------------------------------------------- requests refused at add time


@pytest.fixture(scope="module")
def small_engine(llama_dir: Path) -> Engine:
    """16 tokens of KV cache (4 blocks of 4), shared by the validation tests."""
    return make_engine(llama_dir, num_blocks=4, block_size=4, max_num_batched_tokens=32)


def assert_untouched(engine: Engine) -> None:
    assert not engine.requests and not engine.scheduler.has_work()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_cannot_fit_the_whole_pool_is_refused_naming_both_numbers(small_engine: Engine) -> None:
    with pytest.raises(ValueError, match="max_tokens") as info:
        small_engine.add_request("too-big", None, SamplingParams(max_tokens=9), prompt_token_ids=[7] * 11)
    message = str(info.value)
    assert re.search(r"\bprompt 11\b", message) and re.search(r"\bmax_tokens 9\b", message), message
    assert "4 blocks" in message
    assert_untouched(small_engine)
    # Without max_tokens the request may run to max_model_len, which does not fit either.
    with pytest.raises(ValueError, match=r"prompt 11\b.*max_tokens 149\b"):
        small_engine.add_request("unbounded", None, SamplingParams(max_tokens=None), prompt_token_ids=[7] * 11)
    assert_untouched(small_engine)
    # Exactly the pool is fine, and runs to the end.
    small_engine.add_request("fits", None, SamplingParams(max_tokens=5), prompt_token_ids=[7] * 11)
    out = drain(small_engine)["fits"]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    assert_untouched(small_engine)


def test_an_empty_prompt_is_refused(small_engine: Engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        small_engine.add_request("empty", None, SamplingParams(), prompt_token_ids=[])
    assert_untouched(small_engine)


@pytest.mark.parametrize("length", [MAX_MODEL_LEN, MAX_MODEL_LEN + 10])
def test_a_prompt_of_max_model_len_or_more_is_refused_naming_both_numbers(small_engine: Engine, length: int) -> None:
    with pytest.raises(ValueError) as info:
        small_engine.add_request("long", None, SamplingParams(max_tokens=1), prompt_token_ids=[7] * length)
    message = str(info.value)
    assert re.search(rf"\b{length} tokens\b", message) and re.search(rf"\b{MAX_MODEL_LEN}\b", message), message
    assert "max_model_len" in message
    assert_untouched(small_engine)


def test_out_of_vocab_ids_and_reused_ids_are_refused(small_engine: Engine) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        small_engine.add_request("oov", None, SamplingParams(max_tokens=1), prompt_token_ids=[7, VOCAB])
    assert_untouched(small_engine)
    small_engine.add_request("dup", None, SamplingParams(max_tokens=1), prompt_token_ids=[7])
    with pytest.raises(ValueError, match="already in use"):
        small_engine.add_request("dup", None, SamplingParams(max_tokens=1), prompt_token_ids=[8])
    first = small_engine.requests["dup"].seqs[0]
    assert drain(small_engine)["dup"].outputs[0].token_ids == [fake_token(first.seq_id, 1)]  # the first request ran
    assert_untouched(small_engine)


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize("chunked", [True, False])
def test_a_request_larger_than_pool_minus_watermark_still_runs(llama_dir: Path, chunked: bool) -> None:
    # 200 blocks keep a watermark of 2; a 199-token prompt fits the pool (it is accepted) so it must also run.
    engine = Engine(
        EngineConfig(
            model=str(llama_dir), max_model_len=300, block_size=1, max_num_batched_tokens=300,
            enable_chunked_prefill=chunked,
        ),
        executor_factory=functools.partial(FakeExecutor, num_blocks=200),
    )
    engine.executor.engine = engine
    assert engine.block_manager.watermark_blocks == 2
    engine.add_request("big", None, SamplingParams(max_tokens=1), prompt_token_ids=[7] * 199)
    out = drain(engine, max_steps=5)["big"]
    assert len(out.outputs[0].token_ids) == 1
    assert engine.num_free_blocks == 200
