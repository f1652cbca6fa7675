"""What a model built for one pipeline stage uses besides its own layers: the state one stage hands the next,
and the placeholder that stands where another stage's module would be (so layer indices and checkpoint names
stay those of the whole model)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rayinfer.workers.parallel_state import PipelineStage


@dataclass
class IntermediateState:
    """A non-last stage's output and a later stage's input: the decoder stream between layers, kept as the layers
    carry it (the last layer's output and the residual stream, not yet added), so a stage boundary costs no
    extra add and the next stage continues exactly as the unsplit model would. Two [tokens, hidden] tensors."""

    hidden: torch.Tensor
    residual: torch.Tensor

    @classmethod
    def zeros(cls, tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> IntermediateState:
        """A stand-in input of the right shape (the profiling step of a stage that is not first)."""
        return cls(
            torch.zeros(tokens, hidden_size, dtype=dtype, device=device),
            torch.zeros(tokens, hidden_size, dtype=dtype, device=device),
        )


class MissingLayer(nn.Module):
    """Stands where another pipeline stage holds the module: no parameters, and never run."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a module another pipeline stage holds was called on this stage")


def stage_layers(stage: PipelineStage, num_layers: int, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """Every layer index of the model: `build(i)` for the stage's own layers, a `MissingLayer` for the others."""
    return nn.ModuleList(build(i) if stage.owns(i) else MissingLayer() for i in range(num_layers))
