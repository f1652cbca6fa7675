"""Loading a checkpoint tensor that fuses several of our packed parts along dim 0 (Phi-3's qkv_proj, gate_up_proj).

The fused tensor is cut into views, one per part, and each view goes through the parameter's own shard loader, so
tensor parallelism picks each rank's rows of every part exactly as it does for separate q/k/v or gate/up tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from rayinfer.workers.weight_loader import CheckpointTensor

ShardLoader = Callable[[nn.Parameter, object, object], None]


class CheckpointRows:
    """Rows [start, start + length) of a checkpoint tensor, read lazily like the tensor itself."""

    def __init__(self, tensor: CheckpointTensor, start: int, length: int) -> None:
        self.name = tensor.name
        self._tensor = tensor
        self._start = start
        self.shape = (length, *tensor.shape[1:])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            return self._tensor.narrow(0, self._start + start, length)
        return self._tensor.narrow(0, self._start, self.shape[0]).narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])


def fused_rows_loader(shard_loader: ShardLoader, parts: Sequence[tuple[object, int]]) -> ShardLoader:
    """A weight_loader for a checkpoint tensor holding `parts` ((shard_id, rows) in order) stacked along dim 0."""
    expected_rows = sum(rows for _, rows in parts)

    def load(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if loaded.shape[0] != expected_rows:
            raise ValueError(
                f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not hold the fused parts "
                f"{[part for part, _ in parts]} ({expected_rows} rows) that config.json implies"
            )
        start = 0
        for part, rows in parts:
            shard_loader(param, CheckpointRows(loaded, start, rows), part)
            start += rows

    return load
