"""Where steps run. The engine talks to an `Executor`; the in-process one holds the model in this process."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.step_plan import StepPlan
from rayinfer.workers.kv_pool import KVPool, bytes_per_block, default_cpu_pool_bytes
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.model_runner import ModelRunner
from rayinfer.workers.weight_loader import build_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Executor(ABC):
    """Runs steps on one or more workers that hold the model and the KV pool."""

    num_blocks: int

    @abstractmethod
    def execute(self, plan: StepPlan) -> list[int]:
        """Runs one step; returns the token drawn for each chunk that samples, in plan order."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Releases workers; the in-process executor has nothing to release."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow or missing on most CPUs
    return spec.checkpoint_dtype if spec.checkpoint_dtype != torch.float32 else torch.bfloat16


def pool_bytes(config: EngineConfig, block_bytes: int, device: torch.device, max_model_len: int) -> int:
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        # Leave room for activations of the largest step; a profiling forward refines this in the Ray runtime.
        reserve = int(0.05 * total)
        return max(0, int(total * config.gpu_memory_utilization) - used_by_others - reserve)
    return default_cpu_pool_bytes(block_bytes, config.block_size, config.max_num_seqs, max_model_len)


class InProcessExecutor(Executor):
    """One worker, in this process: tensor_parallel_size 1 without Ray."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int, max_num_batched_tokens: int) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs distributed_executor_backend='ray'")
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, spec, device)
        model = build_model(spec, config.model, dtype, device, max_model_len)
        block_bytes = bytes_per_block(spec.num_layers, config.block_size, spec.num_kv_heads, spec.head_dim, dtype)
        self.num_blocks = pool_bytes(config, block_bytes, device, max_model_len) // block_bytes
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes: room for no KV block (one block of {config.block_size} tokens needs "
                f"{block_bytes} bytes)"
            )
        pool = KVPool(spec.num_layers, self.num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim, dtype, device)
        self.runner = ModelRunner(model, pool, spec.vocab_size, device)

    def execute(self, plan: StepPlan) -> list[int]:
        return self.runner.execute(plan)
