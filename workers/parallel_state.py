"""This process's place in its tensor-parallel group, and the collectives the layers need.

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

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


_group = TensorParallelGroup()


def set_tensor_parallel_group(rank: int, size: int) -> None:
    global _group
    _group = TensorParallelGroup(rank, size)


def tp_group() -> TensorParallelGroup:
    return _group
