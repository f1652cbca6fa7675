"""Parameters in a checkpoint format's own layout, tagged with how tensor parallelism cuts them.

`out_dim` / `in_dim` name the dims that run over output / input features (None: held whole by every rank) and
`out_per_element` / `in_per_element` how many features one stored element stands for there (a packing factor,
a group or a block size); workers/layers/linear.py's loaders cut any parameter by these tags.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def stored_param(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    out_dim: int | None,
    in_dim: int | None,
    out_per_element: int = 1,
    in_per_element: int = 1,
    loader: Callable[..., None] | None = None,
) -> nn.Parameter:
    """Registers `name` on `module` (replacing a float weight of that name) with the module's own loader."""
    param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    param.out_dim, param.in_dim = out_dim, in_dim
    param.out_per_element, param.in_per_element = out_per_element, in_per_element
    param.weight_loader = loader or module.default_weight_loader()
    if name in module._parameters:
        del module._parameters[name]
    module.register_parameter(name, param)
    return param


def take_stored(module: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Removes the loaded checkpoint-layout parameters from `module` and returns their tensors."""
    return {name: module._parameters.pop(name).data for name in names if module._parameters.get(name) is not None}


def checked_same_loader(module: nn.Module) -> Callable[..., None]:
    """A loader for a tensor every shard of a merged layer stores alike (an act-order g_idx): loads the first and
    refuses a later one that differs, since one layer can only permute its input one way."""
    inner = module.default_weight_loader()
    seen: dict[int, torch.Tensor] = {}

    def load(param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
        before = seen.get(id(param))
        inner(param, loaded, shard_id)
        if before is not None and not torch.equal(before, param.data):
            raise ValueError(f"checkpoint tensor {loaded.name} differs between the parts of one merged layer")
        seen[id(param)] = param.data.clone()

    return load


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed sequentially (lowest bits first) into int32 along `dim`, unpacked."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    moved = packed.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*moved.shape[:-1], moved.shape[-1] * pack).movedim(-1, dim)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of unpack_int32: unsigned values along `dim` (a multiple of 32 // bits) packed into int32."""
    pack = 32 // bits
    moved = values.to(torch.int64).movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // pack, pack)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (grouped << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the top bit is the int32 sign bit
    return words.to(torch.int32).movedim(-1, dim).contiguous()
