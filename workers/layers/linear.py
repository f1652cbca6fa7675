"""Linear layers split across tensor-parallel ranks, each parameter carrying the loader that cuts its shard."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.parallel_state import tp_group

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; no communication in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = tp_group()
        self.out_per_rank = _divide(out_features, self.tp.size, "output features")
        self.weight = _param(self.out_per_rank, in_features)
        self.weight.weight_loader = self.load_rows
        self.bias = _param(self.out_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_rows

    def load_rows(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.shard_rows = [_divide(n, self.tp.size, "output features") for n in out_sizes]
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def _shard_offset(self, shard_id: int) -> tuple[int, int]:
        return sum(self.shard_rows[:shard_id]), self.shard_rows[shard_id]

    def load_shard(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object) -> None:
        offset, rows = self._shard_offset(shard_id)
        source_start = self._source_start(shard_id, rows)
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, source_start, rows))

    def _source_start(self, shard_id: object, rows: int) -> int:
        return self.tp.rank * rows


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections as one matrix; KV heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp_size = tp_group().size
        self.num_heads = _divide(num_heads, tp_size, "attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "key/value heads")
            self.kv_replicas = 1
        else:
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tensor_parallel_size over key/value heads")
            self.num_kv_heads = 1
        self.head_dim = head_dim
        q_rows = self.num_heads * head_dim
        kv_rows = self.num_kv_heads * head_dim
        super().__init__(hidden_size, [q_rows * tp_size, kv_rows * tp_size, kv_rows * tp_size], bias)
        self.shard_index = {"q": 0, "k": 1, "v": 2}

    def _shard_offset(self, shard_id: object) -> tuple[int, int]:
        return super()._shard_offset(self.shard_index[shard_id])

    def _source_start(self, shard_id: object, rows: int) -> int:
        if shard_id == "q":
            return self.tp.rank * rows
        return (self.tp.rank // self.kv_replicas) * rows


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = tp_group()
        self.in_per_rank = _divide(in_features, self.tp.size, "input features")
        self.weight = _param(out_features, self.in_per_rank)
        self.weight.weight_loader = self.load_columns
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = lambda param, loaded, shard_id=None: param.data.copy_(loaded.full())

    def load_columns(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(linear(x, self.weight))
        return out if self.bias is None else out + self.bias
