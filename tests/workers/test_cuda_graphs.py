"""Decode CUDA graphs: the static-buffer padding is checked on CPU (a stand-in graph replays the forward eagerly
over the same buffers), the real capture on a GPU."""
from __future__ import annotations

import pytest
import torch

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.workers.cuda_graphs import CAPTURE_SIZES, DecodeGraphs, capture_sizes

PROMPTS = ["A", "The quick brown fox jumps over the lazy dog.", "Once upon a time", "Hello world", "café 🙂"]


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64)[-3:] == [32, 48, 64]
    assert capture_sizes(256) == capture_sizes(1000) == list(CAPTURE_SIZES)  # larger decode batches run eagerly


class _EagerReplay:
    """Stands in for a CUDA graph on CPU: replay reruns the forward over the static buffers into a fixed output."""

    def __init__(self, run) -> None:
        self.replay = run


class _CpuDecodeGraphs(DecodeGraphs):
    def _capture_one(self, size: int, pool: object):
        meta = self._meta(size)
        with torch.inference_mode():
            hidden = self.model(self.input_ids[:size], meta)

        def replay() -> None:
            hidden.copy_(self.model(self.input_ids[:size], meta))

        return _EagerReplay(replay), hidden, pool


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    # Different lengths end at different steps, so decode batches shrink through several padded sizes.
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outputs]


def test_padded_static_buffers_give_the_eager_tokens(llama_dir) -> None:
    eager = LLM(str(llama_dir), max_num_seqs=8, max_num_batched_tokens=16)
    prompts = [eager.get_tokenizer().encode(p) for p in PROMPTS]
    expected = _greedy(eager, prompts)

    llm = LLM(str(llama_dir), max_num_seqs=8, max_num_batched_tokens=16)
    worker = llm.engine.executor.worker
    graphs = _CpuDecodeGraphs(worker.model, 8, max_blocks_per_seq=64, max_model_len=worker.max_model_len,
                              device=torch.device("cpu"))
    pool = None  # capture() itself needs CUDA (streams, synchronize); the per-size step is what differs
    for size in reversed(graphs.sizes):
        graph, hidden, pool = graphs._capture_one(size, pool)
        graphs.graphs[size] = (graph, hidden)
    worker.runner.graphs = graphs
    replays = []
    run = graphs.run
    graphs.run = lambda ids, meta: replays.append(ids.shape[0]) or run(ids, meta)
    assert _greedy(llm, prompts) == expected
    assert {1, 3, 5} <= set(replays)  # batches of 5, then fewer, were padded to 8, 4 and 1-row graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_eager_and_transformers(llama_dir, hf_greedy) -> None:
    # A small fixed pool each: by default the first engine would take 90% of the GPU and leave the second none.
    pool = dict(kv_cache_memory_bytes=32 << 20)
    graphed = LLM(str(llama_dir), dtype="float32", max_num_seqs=8, max_num_batched_tokens=16, **pool)
    runner = graphed.engine.executor.worker.runner
    assert runner.graphs is not None and sorted(runner.graphs.graphs) == [1, 2, 4, 8]
    prompts = [graphed.get_tokenizer().encode(p) for p in PROMPTS]
    ours = _greedy(graphed, prompts)
    eager = LLM(str(llama_dir), dtype="float32", max_num_seqs=8, max_num_batched_tokens=16, enforce_eager=True, **pool)
    assert eager.engine.executor.worker.runner.graphs is None
    assert ours == _greedy(eager, prompts)
    assert ours == [hf_greedy(llama_dir, [p], 6 + 5 * i)[0] for i, p in enumerate(prompts)]
