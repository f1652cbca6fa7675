"""q, k and v projections that checkpoints store as ONE tensor, in the two layouts the families use.

- `BlockQKVLinear`: the rows are all of q, then all of k, then all of v (GPT-2's c_attn, GPT-BigCode's
  multi-query c_attn). Each block is cut for tensor parallelism as `QKVParallelLinear` cuts separate q/k/v tensors.
- `PerHeadQKVLinear`: the rows are grouped per head, [heads, 3, head_dim] (Bloom's query_key_value, GPT-BigCode's
  multi-head c_attn). A rank's heads are then one contiguous block of rows, so a plain column split picks them.

Both expose `split(qkv) -> (q, k, v)`, each [tokens, local heads * head_dim].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rayinfer.workers.layers.checkpoint_views import RowRange
from rayinfer.workers.layers.linear import ColumnParallelLinear, QKVParallelLinear, _divide

if TYPE_CHECKING:
    from rayinfer.workers.weight_loader import CheckpointTensor


class BlockQKVLinear(QKVParallelLinear):
    """Loads either one fused [q; k; v] tensor (shard_id None) or separate q/k/v tensors (shard_id "q"/"k"/"v")."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        super().__init__(hidden_size, head_dim, num_heads, num_kv_heads, bias)
        self.source_rows = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        self.weight.weight_loader = self.load_fused
        if self.bias is not None:
            self.bias.weight_loader = self.load_fused

    def load_fused(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if shard_id is not None:
            self.load_shard(param, loaded, shard_id)
            return
        expected = sum(self.source_rows.values())
        if loaded.shape[0] != expected:
            raise ValueError(
                f"fused q/k/v tensor {loaded.name} has {loaded.shape[0]} rows; config.json says {expected}"
            )
        start = 0
        for part, rows in self.source_rows.items():
            self.load_shard(param, RowRange(loaded, start, rows), part)
            start += rows

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)


class PerHeadQKVLinear(ColumnParallelLinear):
    """Multi-head attention only (one K/V head per query head), rows laid out [heads, 3, head_dim]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, bias: bool) -> None:
        super().__init__(hidden_size, 3 * num_heads * head_dim, bias)
        self.num_heads = _divide(num_heads, self.tp.size, "attention heads")
        self.num_kv_heads = self.num_heads
        self.head_dim = head_dim

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_head = qkv.view(qkv.shape[0], self.num_heads, 3, self.head_dim)
        q, k, v = per_head.unbind(dim=2)
        return tuple(t.reshape(qkv.shape[0], -1) for t in (q, k, v))  # type: ignore[return-value]
