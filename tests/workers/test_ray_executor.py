"""The Ray executor: tensor-parallel workers on CPU (gloo), placement, and recovery from a dead worker."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, SamplingParams

PROMPTS = ["A", "Hello world", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _token_prompts(llm: LLM) -> list[dict]:
    tokenizer = llm.get_tokenizer()
    return [{"prompt_token_ids": tokenizer.encode(p)} for p in PROMPTS]


def _ray_llm(model_dir: Path, **engine_args) -> LLM:
    return LLM(str(model_dir), tensor_parallel_size=2, distributed_executor_backend="ray", **engine_args)


@pytest.mark.parametrize(
    ("kv_heads", "compiled_graph"),
    [(2, "0"), (1, "0"), (2, "1")],
    ids=["kv-split", "kv-replicated", "kv-split-compiled-graph"],
)
def test_tp2_matches_tp1_and_transformers(
    kv_heads: int, compiled_graph: str, tiny_checkpoint, hf_greedy, ray_session, monkeypatch
) -> None:
    monkeypatch.setenv("RAYINFER_RAY_COMPILED_GRAPH", compiled_graph)
    model_dir = tiny_checkpoint("llama", num_key_value_heads=kv_heads)
    llm = _ray_llm(model_dir, max_num_batched_tokens=16)
    try:
        assert (llm.engine.executor._graph is not None) == (compiled_graph == "1")
        prompts = _token_prompts(llm)
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        embeddings = [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)]  # rank 0 pools the rows
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
        assert llm.engine.executor.call_workers("num_sequences") == [0, 0]
    finally:
        llm.shutdown()
    alone = LLM(str(model_dir))
    single = [o.outputs[0].token_ids for o in alone.generate(prompts, GREEDY, use_tqdm=False)]
    assert ours == single
    single_embeddings = [o.outputs.embedding for o in alone.embed(prompts, use_tqdm=False)]
    assert torch.allclose(torch.tensor(embeddings), torch.tensor(single_embeddings), atol=1e-5, rtol=0)
    assert ours == hf_greedy(model_dir, [p["prompt_token_ids"] for p in prompts], GREEDY.max_tokens)


@pytest.mark.parametrize("compiled_graph", ["0", "1"], ids=["actor-calls", "compiled-graph"])
def test_killed_worker_is_replaced_and_outputs_are_unchanged(
    compiled_graph: str, llama_dir: Path, ray_session, monkeypatch, run_to_end
) -> None:
    monkeypatch.setenv("RAYINFER_RAY_COMPILED_GRAPH", compiled_graph)
    reference = LLM(str(llama_dir)).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = _ray_llm(llama_dir, max_num_batched_tokens=16)
    try:
        executor = llm.engine.executor
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(str(i), prompt, GREEDY)
        earlier = [delta for _ in range(5) for delta in llm.engine.step()]
        os.kill(executor.worker_pids()[1], signal.SIGKILL)
        finished = run_to_end(llm.engine, earlier)
        assert executor.generation == 2, "the worker group was not replaced"
        assert [finished[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == [
            o.outputs[0].token_ids for o in reference
        ]
        assert all(finished[str(i)].error is None for i in range(len(PROMPTS)))
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_group_that_cannot_be_rebuilt_fails_every_request(llama_dir: Path, ray_session, run_to_end) -> None:
    llm = _ray_llm(llama_dir, max_worker_restarts=0)
    try:
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(str(i), prompt, GREEDY)
        llm.engine.step()
        os.kill(llm.engine.executor.worker_pids()[0], signal.SIGKILL)
        finished = run_to_end(llm.engine)
        assert sorted(finished) == [str(i) for i in range(len(PROMPTS))]
        for out in finished.values():
            assert out.finished and "could not be replaced" in out.error
            assert out.outputs[0].finish_reason == "error"
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_a_request_that_breaks_the_workers_fails_alone(llama_dir: Path, ray_session, monkeypatch, run_to_end) -> None:
    """The issue-15 loop, on real Ray workers: a request whose forward raises in every worker (a prompt id past the
    vocabulary, let through the engine's check here) used to be recomputed after every restart, failing the group
    forever. Now the group is replaced twice, the request fails alone, and the others finish as they would."""
    from rayinfer.scheduler.request_checks import RequestLimits

    reference = LLM(str(llama_dir)).generate(PROMPTS, GREEDY, use_tqdm=False)
    # One rank: a vocabulary split over ranks masks ids outside each rank's share, so nothing would raise.
    llm = LLM(str(llama_dir), distributed_executor_backend="ray", max_num_batched_tokens=32)
    try:
        monkeypatch.setattr(RequestLimits, "check", lambda self, ids, params: None)
        vocab = llm.engine.model_spec.vocab_size
        for i, prompt in enumerate(PROMPTS[:2]):
            llm.engine.add_request(str(i), prompt, GREEDY)
        llm.engine.add_request("poison", None, GREEDY, prompt_token_ids=[5, vocab + 7, 6])
        for i, prompt in enumerate(PROMPTS[2:], start=2):
            llm.engine.add_request(str(i), prompt, GREEDY)
        finished = run_to_end(llm.engine)
        assert llm.engine.executor.generation == 3, "expected two replacements: one marks suspects, one names it"
        assert finished["poison"].error and "failed the worker group twice" in finished["poison"].error
        assert [finished[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == [
            o.outputs[0].token_ids for o in reference
        ]
        assert llm.engine.failure is None and llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_two_engines_side_by_side_then_shutdown_releases_everything(llama_dir: Path, ray_session) -> None:
    from ray.util import placement_group_table

    first, second = _ray_llm(llama_dir), _ray_llm(llama_dir)
    try:
        assert first.engine.executor.engine_id != second.engine.executor.engine_id
        a = first.generate(PROMPTS, GREEDY, use_tqdm=False)
        b = second.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    finally:
        first.shutdown()
    executor = first.engine.executor
    assert placement_group_table(executor.placement_group)["state"] == "REMOVED"
    for rank in range(2):
        with pytest.raises(ValueError):
            ray_session.get_actor(f"rayinfer-{executor.engine_id}-worker-{rank}-gen1")
    try:  # the other engine is untouched
        assert second.generate("Hello", GREEDY, use_tqdm=False)[0].finished
    finally:
        second.shutdown()


def test_abort_frees_blocks_on_every_rank(llama_dir: Path, ray_session, run_to_end) -> None:
    llm = _ray_llm(llama_dir)
    try:
        engine = llm.engine
        engine.add_request("keep", "Hello world", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        engine.add_request("drop", "The quick brown fox", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        engine.step()
        assert engine.executor.call_workers("num_sequences") == [2, 2]
        engine.abort_request("drop")
        assert len(engine.scheduler.running) == 1
        engine.step()  # the next step tells every rank to drop the aborted sequence
        assert engine.executor.call_workers("num_sequences") == [1, 1]
        run_to_end(llm.engine)
        assert engine.num_free_blocks == engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_unshardable_model_fails_at_config_time(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\).*not divisible by 3"):
        LLM(str(llama_dir), tensor_parallel_size=3, distributed_executor_backend="ray")


@pytest.mark.parametrize("compiled_graph", ["0", "1"], ids=["actor-calls", "compiled-graph"])
def test_logprobs_through_pipelined_workers_survive_a_restart(
    compiled_graph: str, llama_dir: Path, ray_session, monkeypatch, run_to_end
) -> None:
    """Logprobs come back from rank 0 of a pipelined group (pending tokens included) and equal the in-process
    engine's; a worker killed mid-prefill loses the prompt logprobs in flight, which are then asked again."""
    monkeypatch.setenv("RAYINFER_RAY_COMPILED_GRAPH", compiled_graph)
    monkeypatch.setenv("RAYINFER_PIPELINE_STEPS", "1")  # CPU workers run in order unless told
    asking = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    params = [asking, GREEDY, asking, asking]
    reference = LLM(str(llama_dir), max_num_batched_tokens=8).generate(PROMPTS, params, use_tqdm=False)
    llm = _ray_llm(llama_dir, max_num_batched_tokens=8)
    try:
        for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
            llm.engine.add_request(str(i), prompt, p)
        earlier = [delta for _ in range(3) for delta in llm.engine.step()]  # the longer prompts are still in prefill
        os.kill(llm.engine.executor.worker_pids()[1], signal.SIGKILL)
        finished = run_to_end(llm.engine, earlier)
        assert llm.engine.executor.generation == 2, "the worker group was not replaced"
    finally:
        llm.shutdown()
    for i, ref in enumerate(reference):
        ours = finished[str(i)]
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        pairs = list(zip(ours.outputs[0].logprobs or [], ref.outputs[0].logprobs or [], strict=True))
        pairs += list(zip(ours.prompt_logprobs or [], ref.prompt_logprobs or [], strict=True))
        assert (ours.prompt_logprobs is None) == (ref.prompt_logprobs is None)
        for a, b in pairs:
            if a is None:
                assert b is None
                continue
            assert a.keys() == b.keys()
            for token_id in a:
                assert a[token_id].rank == b[token_id].rank
                assert a[token_id].logprob == pytest.approx(b[token_id].logprob, abs=1e-4)
