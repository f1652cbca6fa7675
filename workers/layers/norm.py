"""RMSNorm and LayerNorm modules; each forward optionally folds in the residual add: norm(x, residual) returns
(norm(x + residual), x + residual), so decoder layers can carry the residual stream through their norms."""
from __future__ import annotations

import torch
from torch import nn

from rayinfer import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim: weight and an optional bias, or neither when `elementwise_affine` is off (OPT's
    layer_norm_elementwise_affine=False), in which case the weight is a fixed buffer of ones. Replicated across
    tensor-parallel ranks (it normalises the full hidden size)."""

    def __init__(self, hidden_size: int, eps: float, bias: bool = True, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None
        else:
            self.register_buffer("weight", torch.ones(hidden_size), persistent=False)
            self.bias = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        summed = x + residual
        return kernels.layer_norm(summed, self.weight, self.bias, self.eps), summed
