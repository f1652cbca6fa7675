"""LayerNorm module (weight and optional bias) over the last dim, run through `kernels.layer_norm`."""
from __future__ import annotations

import torch
from torch import nn

from rayinfer import kernels


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)
