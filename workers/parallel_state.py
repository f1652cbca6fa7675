"""This process's place in its tensor-parallel group and its pipeline stage, and the collectives the layers need.

With one rank (the in-process executor) every collective is the identity, so the model code is the same
whether or not torch.distributed is initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    # The stage's own process group under pipeline parallelism; None: the default group (all ranks are one stage).
    group: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


_group = TensorParallelGroup()


def set_tensor_parallel_group(rank: int, size: int, group: object | None = None) -> None:
    global _group
    _group = TensorParallelGroup(rank, size, group)


def tp_group() -> TensorParallelGroup:
    return _group


@dataclass(frozen=True)
class PipelineStage:
    """This process's pipeline stage: stage `index` of `count`, holding decoder layers [first_layer, end_layer)."""

    index: int
    count: int
    first_layer: int
    end_layer: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    def owns(self, layer_index: int) -> bool:
        return self.first_layer <= layer_index < self.end_layer


def pipeline_layer_ranges(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    """Each stage's contiguous [first, end) layer range: `partition` (layers per stage) when given, else an even
    split whose remainder goes to the stages before the last (the second-to-last first, then towards the first).

    Why there: the first stage also holds the embedding and the last the final norm, the LM head (each a
    vocab x hidden matrix) and the draw, so the middle stages have the most room and time to spare, and the last
    stage, which every step waits on for its tokens, never gets an extra layer. vLLM's default split places the
    remainder the same way."""
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be at least 1 (got {pp_size})")
    if partition is None:
        if pp_size > num_layers:
            raise ValueError(
                f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} layers (num_hidden_layers): "
                "every stage needs at least one layer"
            )
        base, extra = divmod(num_layers, pp_size)
        sizes = [base] * pp_size
        for i in range(extra):
            sizes[pp_size - 2 - i] += 1
    else:
        sizes = list(partition)
        if len(sizes) != pp_size:
            raise ValueError(
                f"pipeline_layer_partition {sizes} has {len(sizes)} entries; pipeline_parallel_size is {pp_size}"
            )
        if any(not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(
                f"pipeline_layer_partition {sizes}: every stage needs a whole number of layers, at least one"
            )
        if sum(sizes) != num_layers:
            raise ValueError(
                f"pipeline_layer_partition {sizes} sums to {sum(sizes)}; the model has {num_layers} layers "
                "(num_hidden_layers)"
            )
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def pipeline_stage_for(index: int, count: int, num_layers: int, partition: list[int] | None = None) -> PipelineStage:
    """Stage `index` of a `count`-stage pipeline over `num_layers` layers (see `pipeline_layer_ranges`)."""
    ranges = pipeline_layer_ranges(num_layers, count, partition)
    if not 0 <= index < count:
        raise ValueError(f"pipeline stage index {index} is outside pipeline_parallel_size {count}")
    first, end = ranges[index]
    return PipelineStage(index, count, first, end)


_stage: PipelineStage | None = None


def set_pipeline_stage(stage: PipelineStage | None) -> None:
    """The stage the models built from now on are for (read at construction, like the tensor-parallel group);
    None: the whole model."""
    global _stage
    _stage = stage


def pipeline_stage(num_layers: int) -> PipelineStage:
    """The stage set for this process, or, when none is, one stage holding all `num_layers` layers."""
    if _stage is None:
        return PipelineStage(0, 1, 0, num_layers)
    if _stage.end_layer > num_layers or (_stage.is_last and _stage.end_layer != num_layers):
        raise ValueError(f"pipeline stage {_stage} does not fit a model of {num_layers} layers")
    return _stage
