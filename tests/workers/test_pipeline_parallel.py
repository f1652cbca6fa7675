"""Pipeline parallelism on Ray (CPU workers, gloo): stages of uneven layer ranges, micro-batches in flight, and a
stage's dead worker replaced without changing any output."""
from __future__ import annotations

import os
import signal

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.scheduler.sampling_params import BeamSearchParams

PROMPTS = ["A", "Hello world", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _pp_llm(model_dir, pp: int = 2, tp: int = 1, **engine_args) -> LLM:
    return LLM(str(model_dir), pipeline_parallel_size=pp, tensor_parallel_size=tp,
               distributed_executor_backend="ray", dtype="float32", **engine_args)


@pytest.mark.parametrize(
    ("layers", "tp", "partition"),
    [(3, 1, None), (5, 2, [3, 2])],
    ids=["pp2-3-layers", "pp2xtp2-5-layers-3+2"],
)
def test_greedy_equals_transformers(layers, tp, partition, tiny_checkpoint, hf_greedy, coverage_prompts,
                                    varied, ray_session) -> None:
    """Layer counts that do not split evenly; a 16-token budget splits the prompts over steps (chunked prefill)."""
    model_dir = tiny_checkpoint("llama", num_hidden_layers=layers)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    varied("pp", reference)
    llm = _pp_llm(model_dir, tp=tp, pipeline_layer_partition=partition, max_num_batched_tokens=16)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
        assert llm.engine.executor.call_workers("num_sequences") == [0] * (2 * tp)
    finally:
        llm.shutdown()


def test_sampling_prefix_caching_preemption_and_beam_search_equal_one_stage(tiny_checkpoint, ray_session) -> None:
    """Seeded n=2 sampling with prefix caching, in a pool small enough to preempt, and beam search: the two-stage
    engine gives what the one-process engine gives."""
    model_dir = tiny_checkpoint("llama", num_hidden_layers=3)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    prompts = [p + " and the same long shared prefix for caching" for p in PROMPTS] * 2
    beam = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    args = dict(enable_prefix_caching=True, kv_cache_memory_bytes=72 * 1024, block_size=4, max_num_batched_tokens=32)

    def run(llm: LLM) -> tuple[list, list, int]:
        sampled = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
        beams = [[c.token_ids for c in r.outputs] for r in llm.beam_search(PROMPTS[:2], beam)]
        return sampled, beams, llm.engine.scheduler.num_preemptions

    alone = run(LLM(str(model_dir), dtype="float32", **args))
    llm = _pp_llm(model_dir, **args)
    try:
        staged = run(llm)
        assert llm.engine.block_manager.num_prefix_hits > 0
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    finally:
        llm.shutdown()
    assert staged[2] > 0, "the pool was meant to be small enough to preempt"
    assert staged[:2] == alone[:2]


def test_a_killed_stage_worker_is_replaced_and_outputs_are_unchanged(tiny_checkpoint, ray_session, run_to_end) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=3)
    reference = LLM(str(model_dir), dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = _pp_llm(model_dir, max_num_batched_tokens=16)
    try:
        executor = llm.engine.executor
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(str(i), prompt, GREEDY)
        earlier = [delta for _ in range(4) for delta in llm.engine.step()]
        os.kill(executor.worker_pids()[1], signal.SIGKILL)  # the last stage's worker, mid-generation
        finished = run_to_end(llm.engine, earlier)
        assert executor.generation == 2, "the worker group was not replaced"
        assert [finished[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == [
            o.outputs[0].token_ids for o in reference
        ]
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_micro_batches_keep_both_stages_in_flight(tiny_checkpoint, ray_session) -> None:
    """Two steps are in flight at once (one per stage) while many sequences decode."""
    model_dir = tiny_checkpoint("llama", num_hidden_layers=3)
    llm = _pp_llm(model_dir)
    try:
        engine = llm.engine
        assert engine.executor.max_steps_in_flight == 2
        for i in range(8):
            engine.add_request(str(i), PROMPTS[i % len(PROMPTS)], GREEDY)
        most_in_flight = 0
        while engine.has_unfinished_requests():
            engine.step()
            most_in_flight = max(most_in_flight, len(engine._in_flight) + 1)
        assert most_in_flight == 2
    finally:
        llm.shutdown()
