"""Views of a checkpoint tensor for parameter loaders whose checkpoint layout differs from ours.

Each view keeps the `CheckpointTensor` interface (name, shape, narrow, full) and still reads only what the loader
asks for, so the existing tensor-parallel loaders (which cut rows or columns) work on them unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor


class TransposedTensor:
    """A 2-D checkpoint tensor stored [in, out] (GPT-2's Conv1D) seen as the [out, in] of a torch Linear."""

    def __init__(self, tensor: CheckpointTensor | Any) -> None:
        if len(tensor.shape) != 2:
            raise ValueError(f"checkpoint tensor {tensor.name} of shape {tensor.shape} is not a 2-D Conv1D weight")
        self.tensor = tensor
        self.name = tensor.name
        self.shape = tuple(reversed(tensor.shape))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.tensor.narrow(1 - dim, start, length).t()

    def full(self) -> torch.Tensor:
        return self.tensor.full().t()


class RowRange:
    """Rows [start, start + rows) of a checkpoint tensor (one block of a fused projection), as a tensor of its own."""

    def __init__(self, tensor: CheckpointTensor | Any, start: int, rows: int) -> None:
        self.tensor = tensor
        self.name = tensor.name
        self.start = start
        self.shape = (rows, *tensor.shape[1:])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            return self.tensor.narrow(0, self.start + start, length)
        return self.tensor.narrow(0, self.start, self.shape[0]).narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])


def load_transposed(module: nn.Module) -> None:
    """Makes the 2-D weight of `module` (a linear) load from a checkpoint tensor stored [in, out]; its own loader
    (which may cut a tensor-parallel shard) then reads the transposed view."""
    param = module.weight
    inner = getattr(param, "weight_loader")

    def loader(p: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        inner(p, TransposedTensor(loaded), shard_id)

    param.weight_loader = loader


ShardLoader = Callable[[nn.Parameter, object, object], None]


def fused_rows_loader(shard_loader: ShardLoader, parts: Sequence[tuple[object, int]]) -> ShardLoader:
    """A weight_loader for a checkpoint tensor holding `parts` ((shard_id, rows) in order) stacked along dim 0
    (Phi-3's qkv_proj and gate_up_proj): each part's rows go through the parameter's own shard loader, so tensor
    parallelism picks each rank's rows of every part as it does for separate tensors."""
    expected_rows = sum(rows for _, rows in parts)

    def load(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if loaded.shape[0] != expected_rows:
            raise ValueError(
                f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not hold the fused parts "
                f"{[part for part, _ in parts]} ({expected_rows} rows) that config.json implies"
            )
        start = 0
        for part, rows in parts:
            shard_loader(param, RowRange(loaded, start, rows), part)
            start += rows

    return load
