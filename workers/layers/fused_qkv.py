"""A QKV projection whose checkpoint stores q, k and v fused in one tensor with a family-specific row order.

- "per_head": rows [heads, 3, head_dim] (GPT-NeoX, Bloom, GPT-BigCode multi-head, Falcon without multi-query).
- "blocks": all q heads, then the k heads, then the v heads (GPT-2's c_attn, GPT-BigCode's and Falcon's
  multi-query layout with one K/V head).
- "grouped": each KV head's queries, then its k and v: [kv_heads, heads / kv_heads + 2, head_dim] (Falcon's new
  decoder architecture).

`FusedQKVLayout.row_of(kind, head)` gives the first checkpoint row of one head; the loader copies this rank's heads
into our [q | k | v] parameter, reading only those rows. Separate q/k/v tensors (OPT) load as in
`QKVParallelLinear`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from rayinfer.workers.layers.linear import QKVParallelLinear

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor


@dataclass(frozen=True)
class FusedQKVLayout:
    """kind: "per_head" ([heads, 3, d]), "blocks" ([heads + 2 * kv, d]) or "grouped" ([kv, heads/kv + 2, d])."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.kind not in ("per_head", "blocks", "grouped"):
            raise ValueError(f"fused qkv layout {self.kind!r} is not one of per_head, blocks, grouped")
        if self.kind == "per_head" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"per-head fused qkv needs as many key/value heads as heads ({self.num_heads})")

    def row_of(self, kind: str, head: int) -> int:
        """First row, in the checkpoint tensor, of head `head` of q, k or v (kind "q", "k" or "v")."""
        part = "qkv".index(kind)
        if self.kind == "per_head":
            slot = 3 * head + part
        elif self.kind == "blocks":
            slot = head + (self.num_heads + (part - 1) * self.num_kv_heads if part else 0)
        else:
            group = self.num_heads // self.num_kv_heads
            if kind == "q":
                slot = (head // group) * (group + 2) + head % group
            else:
                slot = head * (group + 2) + group + part - 1
        return slot * self.head_dim


class FusedQKVParallelLinear(QKVParallelLinear):
    """QKVParallelLinear that also loads the fused checkpoint tensor (shard_id None) of `layout`."""

    def __init__(self, hidden_size: int, layout: FusedQKVLayout, bias: bool) -> None:
        super().__init__(hidden_size, layout.head_dim, layout.num_heads, layout.num_kv_heads, bias)
        self.layout = layout
        self.weight.weight_loader = self.load_fused
        if self.bias is not None:
            self.bias.weight_loader = self.load_fused

    def _local_heads(self, kind: str) -> range:
        if kind == "q":
            return range(self.tp.rank * self.num_heads, (self.tp.rank + 1) * self.num_heads)
        first = (self.tp.rank // self.kv_replicas) * self.num_kv_heads
        return range(first, first + self.num_kv_heads)

    def load_fused(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if shard_id is not None:  # separate q/k/v tensors still load as in QKVParallelLinear
            self.load_shard(param, loaded, shard_id)
            return
        d = self.head_dim
        for kind in "qkv":
            offset, _ = self._shard_offset(kind)
            for i, head in enumerate(self._local_heads(kind)):
                rows = loaded.narrow(0, self.layout.row_of(kind, head), d)
                param.data.narrow(0, offset + i * d, d).copy_(rows)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q, k and v, each [tokens, local heads * head_dim]."""
        kv_size = self.num_kv_heads * self.head_dim
        return qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
