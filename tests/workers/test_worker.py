"""A worker on its own: the profiling step that sizes the KV pool on a GPU, and the pool it then sizes."""
from __future__ import annotations

from pathlib import Path

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.workers.model_config import load_model_spec
from rayinfer.workers.worker import Worker


def _worker(model_dir: Path, max_model_len: int, budget: int, **config) -> Worker:
    worker = Worker(EngineConfig(model=str(model_dir), **config), load_model_spec(model_dir), max_model_len, budget)
    worker.init_distributed("", 0)
    worker.load_model()
    return worker


def test_largest_step_runs_on_a_scratch_pool(llama_dir: Path) -> None:
    # A budget larger than one sequence may be: the step spreads it over several sequences.
    worker = _worker(llama_dir, max_model_len=100, budget=250, block_size=16)
    blocks = worker.run_largest_step()
    assert blocks == 7 + 7 + 4  # 99 + 99 + 52 tokens in blocks of 16
    assert worker.runner.kv_pool.num_blocks == blocks
    assert not worker.sequences


@pytest.mark.gpu
def test_gpu_pool_is_sized_by_profiling(llama_dir: Path) -> None:
    worker = _worker(llama_dir, max_model_len=512, budget=2048, device="cuda", gpu_memory_utilization=0.5)
    blocks = worker.num_available_blocks()
    assert blocks > 0
    worker.init_cache(blocks)
    import torch

    assert torch.cuda.memory_reserved() < 0.55 * torch.cuda.get_device_properties(0).total_memory
