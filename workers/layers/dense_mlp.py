"""The non-gated MLP (GPT-2, GPT-BigCode, OPT, Bloom, GPT-J, GPT-NeoX, Falcon, Phi): fc -> activation -> proj.

fc is column-parallel and proj row-parallel, so each rank holds a slice of the intermediate features and one
all-reduce sums the output, as for the gated MLP. The activations follow transformers' ACT2FN formulas exactly (same operation order), since a float32 greedy
comparison can flip on the last bit: "gelu" is the erf form, "gelu_new" the tanh formula written out,
"gelu_pytorch_tanh" torch's fused tanh form (also Bloom's own GELU: its constant 0.79788456 is sqrt(2/pi) in
float32).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.workers.layers.linear import ColumnParallelLinear, RowParallelLinear

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_fn(name: str, field: str = "activation") -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation name -> the function; a ValueError naming the config field for names this engine
    lacks."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{field} {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}") from None


class DenseMLP(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, activation: str, bias: bool = True, field: str = "activation_function"
    ) -> None:
        super().__init__()
        self.act = activation_fn(activation, field)
        self.fc = ColumnParallelLinear(hidden, intermediate, bias=bias)
        self.proj = RowParallelLinear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))
