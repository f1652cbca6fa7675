"""The non-gated MLP of GPT-2, GPT-BigCode, OPT and Bloom: fc -> activation -> proj, both with biases.

fc is column-parallel and proj row-parallel, so each rank holds a slice of the intermediate features and one
all-reduce sums the output, as for the gated MLP.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.workers.layers.linear import ColumnParallelLinear, RowParallelLinear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names -> the same function. gelu_new, gelu_pytorch_tanh and Bloom's own GELU are all the tanh
# approximation (Bloom's constant 0.79788456 is sqrt(2/pi) rounded, the same float32); "gelu" is the exact erf form.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
}


def activation_fn(name: str, field: str = "activation_function") -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation for a config's name; an unknown name is a ValueError naming the config field."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{field} {name!r} is not supported; supported: {sorted(ACTIVATIONS)}") from None


class DenseMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        bias: bool = True,
        field: str = "activation_function",
    ) -> None:
        super().__init__()
        self.act = activation_fn(activation, field)
        self.fc = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias)
        self.proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))
