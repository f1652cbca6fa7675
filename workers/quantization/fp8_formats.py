"""FP8 e4m3 weights (transformers' and vLLM's `fp8`, compressed-tensors' float-quantized): the parameters each
stores, per rank, and their conversion after loading into `Fp8QuantizedWeight`.

The weight is [N, K] float8_e4m3fn, cut like a float weight. Its scale is one of: per-tensor (one value, named
weight_scale or weight_scale_inv), per-channel ([N] or [N, 1]) or block-wise ([ceil(N/bn), ceil(K/bk)]); W =
weight * scale in every case. Per-tensor scales become per-channel on loading, so that q, k and v (or gate and
up), each quantised with its own scale, share one merged weight. A static scheme's `input_scale` is read and
dropped: activations are scaled per token instead (dynamic), which is at least as exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rayinfer.workers.quantization.config import Fp8Scheme
from rayinfer.workers.quantization.quantized_weight import Fp8QuantizedWeight
from rayinfer.workers.quantization.stored_params import stored_param, take_stored

SCALE_NAMES = ("weight_scale", "weight_scale_inv")


class _ScaleRows:
    """A per-tensor ([] or [1]) or per-channel ([N] / [N, 1]) checkpoint scale seen as [N] rows, so the merged and
    column loaders cut it like any output-feature tensor; a per-tensor value stands for every row."""

    def __init__(self, tensor: Any) -> None:
        self.tensor, self.name = tensor, tensor.name
        numel = 1
        for size in tensor.shape:
            numel *= size
        self.scalar = numel == 1
        self.shape = (numel,)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if self.scalar:
            return self.tensor.full().reshape(1).expand(length)
        return self.tensor.narrow(0, start, length).reshape(-1)

    def full(self) -> torch.Tensor:
        return self.tensor.full().reshape(-1)


def _rows_loader(module: nn.Module) -> Any:
    inner = module.default_weight_loader()

    def load(param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
        inner(param, _ScaleRows(loaded), shard_id)

    return load


def _ignored(param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
    """input_scale of a static scheme: activations are scaled per token, so it is not used."""


def create_fp8_params(module: nn.Module, scheme: Fp8Scheme, scale_name: str, has_input_scale: bool, what: str) -> None:
    """Replaces `module`'s float weight with an FP8 weight and the scale named as in the checkpoint."""
    k, n = module.in_features, module.out_features
    if "weight" in module._parameters:
        del module._parameters["weight"]
    stored_param(module, "weight", (n, k), torch.float8_e4m3fn, 0, 1)
    if scheme.block_size is not None:
        bn, bk = scheme.block_size
        if n % bn or k % bk:
            raise ValueError(f"{what}: this rank's weight [{n}, {k}] does not split into whole FP8 blocks "
                             f"{list(scheme.block_size)}; use a tensor_parallel_size that keeps blocks whole")
        stored_param(module, scale_name, (n // bn, k // bk), torch.float32, 0, 1, bn, bk)
    else:
        stored_param(module, scale_name, (n,), torch.float32, 0, None, loader=_rows_loader(module))
    if has_input_scale:
        stored_param(module, "input_scale", (), torch.float32, None, None, loader=_ignored)


def finish_fp8(module: nn.Module, scheme: Fp8Scheme) -> Fp8QuantizedWeight:
    t = take_stored(module, ("weight", *SCALE_NAMES, "input_scale"))
    scale = next(t[name] for name in SCALE_NAMES if name in t)
    return Fp8QuantizedWeight(t["weight"].contiguous(), scale.contiguous(), scheme.block_size,
                              scheme.dynamic_activations)
