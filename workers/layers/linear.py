"""Linear layers split across tensor-parallel ranks, each parameter carrying the loader that cuts its shard.

A layer holds either a float `weight` [out, in] or, for a quantised checkpoint, the parameters of its format
(workers/quantization) which after loading become one packed `QuantizedWeight`. The loaders cut every parameter
the same way whatever it holds: each declares which of its dims runs over output features (`out_dim`) and input
features (`in_dim`, None when every rank holds it whole) and how many features one stored element stands for
along them (`out_per_element`, `in_per_element`: a packing factor, a group or a block size), so AWQ's packed
columns, GPTQ's packed rows and FP8's block scales shard at their group boundaries without a loader of their own.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.parallel_state import tp_group

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor



class PackedWeight(Protocol):
    """What a linear needs of its quantised weight (workers/quantization builds it; that package imports this
    one, so only the shape is named here)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...


_deferred = False  # while True, linear weights are built on the meta device (see deferred_linear_weights)


@contextlib.contextmanager
def deferred_linear_weights() -> Iterator[None]:
    """Builds linear weights on the meta device, so that a quantised model never holds its float weights: after
    construction each linear either takes its quantised parameters or `materialize_weight`s the float one."""
    global _deferred
    previous, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = previous


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _weight(out_features: int, in_features: int) -> nn.Parameter:
    if _deferred:
        return nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
    return _param(out_features, in_features)


def _stored(features: int, per_element: int, param: nn.Parameter) -> int:
    if features % per_element:
        raise ValueError(f"{features} features do not split into whole stored elements of {per_element} "
                         f"(parameter of shape {tuple(param.shape)}); this shard boundary cuts a packed group")
    return features // per_element


def _load_rank_slice(param: nn.Parameter, loaded: CheckpointTensor, dim: int | None, rank: int) -> None:
    """This rank's slice of `loaded` along `dim` (as long as the parameter is there), or all of it for None."""
    if dim is None:
        param.data.copy_(loaded.full())
        return
    size = param.shape[dim]
    param.data.copy_(loaded.narrow(dim, rank * size, size))


class ParallelLinear(nn.Module):
    """What every tensor-parallel linear shares: its float or quantised weight and the forward through it."""

    in_features: int  # this rank's input features
    out_features: int  # this rank's output features
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.tp = tp_group()
        self.quantized: PackedWeight | None = None

    def default_weight_loader(self) -> object:
        """The loader this class gives its weight; a model that replaced it reads a layout of its own."""
        raise NotImplementedError

    def materialize_weight(self) -> None:
        """Allocates a weight built on the meta device (deferred_linear_weights); called under the model's device
        and dtype, as construction is."""
        if self.weight.device.type != "meta":
            return
        loader = self.weight.weight_loader
        self.weight = nn.Parameter(torch.empty(self.weight.shape), requires_grad=False)
        self.weight.weight_loader = loader

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.matmul(x)
        return linear(x, self.weight)


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks; no communication in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.out_per_rank = self.out_features = _divide(out_features, self.tp.size, "output features")
        self.in_features = in_features
        self.weight = _weight(self.out_per_rank, in_features)
        self.weight.weight_loader = self.load_rows
        self.bias = _param(self.out_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_rows

    def default_weight_loader(self) -> object:
        return self.load_rows

    def load_rows(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        _load_rank_slice(param, loaded, getattr(param, "out_dim", 0), self.tp.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return linear(x, self.weight, self.bias)
        out = self.quantized.matmul(x)
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.shard_rows = [_divide(n, self.tp.size, "output features") for n in out_sizes]
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def default_weight_loader(self) -> object:
        return self.load_shard

    def _shard_offset(self, shard_id: int) -> tuple[int, int]:
        return sum(self.shard_rows[:shard_id]), self.shard_rows[shard_id]

    def load_shard(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object) -> None:
        dim, per_element = getattr(param, "out_dim", 0), getattr(param, "out_per_element", 1)
        if dim is None:  # held whole by every shard (a shape record, an act-order g_idx): each loads the same
            param.data.copy_(loaded.full())
            return
        offset, rows = self._shard_offset(shard_id)
        offset, rows = _stored(offset, per_element, param), _stored(rows, per_element, param)
        source_start = self._source_start(shard_id, rows)
        param.data.narrow(dim, offset, rows).copy_(loaded.narrow(dim, source_start, rows))

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


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_per_rank = self.in_features = _divide(in_features, self.tp.size, "input features")
        self.out_features = out_features
        self.weight = _weight(out_features, self.in_per_rank)
        self.weight.weight_loader = self.load_columns
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = lambda param, loaded, shard_id=None: param.data.copy_(loaded.full())

    def default_weight_loader(self) -> object:
        return self.load_columns

    def load_columns(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        _load_rank_slice(param, loaded, getattr(param, "in_dim", 1), self.tp.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x))
        return out if self.bias is None else out + self.bias
