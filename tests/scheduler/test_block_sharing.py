"""Shared KV blocks on the real model: a request's sequences share their prompt (copy on write where they
diverge), and the prefix cache lets later requests reuse earlier ones' blocks. Outputs never change."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def long_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", max_position_embeddings=2048)


def _engine(model_dir: Path, **config: object) -> Engine:
    engine = Engine(EngineConfig(model=str(model_dir), **config))
    worker = engine.executor.worker
    run = worker.execute
    engine.num_tokens_run = 0

    def counting(plan):
        engine.num_tokens_run += plan.num_tokens
        return run(plan)

    worker.execute = counting
    return engine


@pytest.fixture
def run(run_to_end):
    """run(engine, prompts, params) -> each request's whole output, once every block came back."""

    def run_prompts(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY):
        for request_id, ids in prompts.items():
            engine.add_request(request_id, None, params, prompt_token_ids=ids)
        finals = run_to_end(engine)
        assert engine.num_free_blocks == engine.block_manager.num_blocks  # every block came back
        return finals

    return run_prompts


def _ids(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(6, 500) for _ in range(count)]


def test_n8_holds_a_1k_prompt_once_and_each_sequence_equals_transformers(long_dir: Path, hf_greedy, run_to_end) -> None:
    prompt = _ids(random.Random(0), 1024)
    engine = _engine(long_dir, block_size=16, max_num_batched_tokens=512, max_model_len=2048)
    engine.add_request("n8", None, SamplingParams(n=8, temperature=0.0, max_tokens=6, ignore_eos=True),
                       prompt_token_ids=prompt)
    seqs = engine.requests["n8"].seqs
    while not all(seq.output_token_ids for seq in seqs):
        engine.step()
    manager = engine.block_manager
    shared = seqs[0].block_table[:63]  # the prompt's full blocks; its 1024th token lands in a 64th, per sequence
    assert all(seq.block_table[:63] == shared for seq in seqs)
    assert all(manager.ref_count(block) == 8 for block in shared)
    held = {block for seq in seqs for block in seq.block_table}
    assert manager.num_blocks - manager.num_free_blocks == len(held)
    assert len(held) <= 63 + 8 * 2  # vs 8 * 65 unshared: the prompt once, then each sequence's own tail
    run_to_end(engine)
    expected = hf_greedy(long_dir, [prompt], 6)[0]
    assert [seq.output_token_ids for seq in seqs] == [expected] * 8
    assert engine.num_free_blocks == manager.num_blocks


def test_seeded_n4_is_the_same_alone_and_in_a_mixed_batch(llama_dir: Path, run) -> None:
    rng = random.Random(1)
    prompt = _ids(rng, 37)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True)
    alone = run(_engine(llama_dir, block_size=4), {"sampled": prompt}, params)["sampled"]
    engine = _engine(llama_dir, block_size=4, max_num_batched_tokens=24)
    for i in range(3):
        engine.add_request(f"other-{i}", None, SamplingParams(n=2, temperature=0.7, seed=i, max_tokens=7),
                           prompt_token_ids=_ids(rng, 5 + 11 * i))
    mixed = run(engine, {"sampled": prompt}, params)["sampled"]
    assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1  # four different draws, not one copied


@pytest.mark.parametrize("chunk", [16, 64])
def test_prefix_cache_hits_skip_prefill_and_change_nothing(llama_dir: Path, hf_greedy, chunk: int, run) -> None:
    rng = random.Random(2)
    system = _ids(rng, 70)
    first = {f"a{i}": system + _ids(rng, 3 + i) for i in range(3)}
    second = {f"b{i}": system + _ids(rng, 5 + 2 * i) for i in range(3)}
    expected = dict(zip([*first, *second], hf_greedy(llama_dir, [*first.values(), *second.values()], 8)))

    plain = _engine(llama_dir, block_size=8, max_num_batched_tokens=chunk)
    cached = _engine(llama_dir, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=True)
    for engine in (plain, cached):
        outs = {**run(engine, first), **run(engine, second)}
        assert {rid: out.outputs[0].token_ids for rid, out in outs.items()} == expected
    # The second wave found the 64 tokens of the system prompt's 8 full blocks cached, and did not run them.
    stats = cached.stats()
    assert stats["prefix_cache_hits"] >= 3 * 64
    assert plain.num_tokens_run - cached.num_tokens_run >= 3 * 64


def test_evicted_prefix_is_recomputed_correctly(llama_dir: Path, hf_greedy, run) -> None:
    rng = random.Random(3)
    shared = _ids(rng, 40)
    again = {"again": shared + _ids(rng, 4)}
    fillers = {f"fill{i}": _ids(rng, 60) for i in range(4)}
    block_bytes = _engine(llama_dir, block_size=8).executor.worker._block_bytes()
    # A pool of 20 blocks: the fillers must evict the cached prefix before it is asked for again.
    engine = _engine(llama_dir, block_size=8, enable_prefix_caching=True, kv_cache_memory_bytes=20 * block_bytes,
                     max_num_seqs=2)
    assert engine.block_manager.num_blocks == 20
    run(engine, {"first": shared + _ids(rng, 4)})
    run(engine, fillers)
    hits_before = engine.block_manager.num_prefix_hits
    out = run(engine, again)["again"]
    assert engine.block_manager.num_prefix_hits == hits_before  # evicted: nothing left to hit
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, [again["again"]], 8)[0]
