"""Executors: the in-process one holds one worker in this process; the Ray one drives worker actors."""
from __future__ import annotations

from collections.abc import Callable

from rayinfer.configs import EngineConfig
from rayinfer.workers.executor_interface import Executor
from rayinfer.workers.grammar import GrammarSpec
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.worker import Worker


class InProcessExecutor(Executor):
    """One worker, in this process: tensor_parallel_size 1 without Ray."""

    def __init__(
        self, config: EngineConfig, spec: ModelSpec, max_model_len: int, max_num_batched_tokens: int, engine_id: str = ""
    ) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs distributed_executor_backend='ray'")
        self.worker = Worker(config, spec, max_model_len, max_num_batched_tokens)
        self.worker.init_distributed("", 0)
        self.worker.load_model()
        self.num_blocks = self.worker.num_available_blocks()
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes: room for no KV block (one block of {config.block_size} tokens needs "
                f"{self.worker._block_bytes()} bytes)"
            )
        self.worker.init_cache(self.num_blocks, capture_graphs=True)

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.worker.execute(plan)

    def prepare_grammar(self, spec: GrammarSpec) -> tuple[str, str] | None:
        return self.worker.prepare_grammar(spec)


def default_executor_factory(config: EngineConfig) -> Callable[..., Executor]:
    """Ray when asked for (or needed by tensor parallelism), else the in-process worker."""
    if config.executor_backend == "ray":
        from rayinfer.workers.ray_executor import RayExecutor

        return RayExecutor
    return InProcessExecutor
