"""LayerNorm flavours of the Llama-shaped families, over `norm.LayerNorm`: bias-free (Cohere), non-parametric
(OLMo v1), and per-head norms of q/k with one weight row per head (StableLM, Cohere)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.workers.layers.norm import LayerNorm

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor


class BiasFreeLayerNorm(LayerNorm):
    """Cohere's LayerNorm: a weight, no bias."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps, bias=False)


class NonParametricLayerNorm(LayerNorm):
    """OLMo v1's LayerNorm: no weight and no bias in the checkpoint (the kernel's unit weight is a buffer, so the
    loader neither expects nor fills it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps, elementwise_affine=False)


# StableLM stores one LayerNorm per head: ...q_layernorm.norms.<head>.weight.
_HEAD_INDEX = re.compile(r"\.norms\.(\d+)\.")


class PerHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features of q or k [T, heads * head_dim], each head with its own weight row.

    `weight` is [local heads, head_dim]: a tensor-parallel rank holds the rows of its own heads, from
    `first_head` on, so the norm splits with the heads. The loader takes either one [heads, head_dim] tensor
    (Cohere's q_norm.weight) or one [head_dim] tensor per head (StableLM's q_layernorm.norms.<h>.weight, whose
    head index it reads from the checkpoint name).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float, first_head: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.first_head = first_head
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self.load_heads
        self.register_buffer("unit_weight", torch.ones(head_dim), persistent=False)
        # Rows no checkpoint tensor has filled yet: the loader's own check sees one parameter, not its rows.
        self.unloaded_heads = set(range(first_head, first_head + num_heads))

    def load_heads(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if len(loaded.shape) == 2:  # every head's row in one tensor
            if loaded.shape[1] != self.head_dim:
                raise ValueError(
                    f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not fit head_dim {self.head_dim}"
                )
            param.data.copy_(loaded.narrow(0, self.first_head, self.num_heads))
            self.unloaded_heads.clear()
            return
        match = _HEAD_INDEX.search(loaded.name)
        if match is None or loaded.shape != (self.head_dim,):
            raise ValueError(f"checkpoint tensor {loaded.name} of shape {loaded.shape} is not a per-head norm weight")
        head = int(match.group(1))
        if self.first_head <= head < self.first_head + self.num_heads:
            param.data[head - self.first_head].copy_(loaded.full())
            self.unloaded_heads.discard(head)
        # else: another rank's head, nothing to read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unloaded_heads:
            raise ValueError(f"the checkpoint has no norm weight for heads {sorted(self.unloaded_heads)}")
        tokens = x.shape[0]
        heads = x.reshape(tokens, self.num_heads, self.head_dim)
        normed = kernels.layer_norm(heads, self.unit_weight, None, self.eps)
        return (normed * self.weight).reshape(tokens, -1)
