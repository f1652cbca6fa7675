"""The packed weight a quantised linear computes with, in the layout the kernels read.

On CUDA the kernels dequantise in registers (kernels/quant_matmul_triton.py, kernels/fp8_matmul.py); on CPU each
call dequantises the layer's weight to the activation dtype and multiplies as an unquantised layer does, so a
float32 CPU run equals transformers running the dequantised weights. Either way only the packed form is kept.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.kernels.fp8_matmul import dequantize_fp8_weight, fp8_matmul_cpu
from rayinfer.kernels.quant_matmul import dequantize_int_weight, int_quant_matmul_cpu
from rayinfer.workers.layers.cpu_matmul import linear


class QuantizedWeight(nn.Module):
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class IntQuantizedWeight(QuantizedWeight):
    """qweight int32 [K / (32 // bits), N] packed along K; scales [G, N]; zeros uint8 [G, N]; g_idx int32 [K]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("g_idx", g_idx)
        self.bits = bits
        self.group_size = group_size  # None: g_idx is a permutation (GPTQ act-order), not k // group_size

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in `dtype`."""
        return dequantize_int_weight(self.qweight, self.scales, self.zeros, self.g_idx, self.bits, dtype=dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.qweight, self.scales, self.zeros, self.g_idx, self.bits, self.group_size)
        if x.device.type == "cpu" and kernels.kernel_backend(x) == "torch":
            return int_quant_matmul_cpu(x, *args, linear=linear)
        return kernels.int_quant_matmul(x, *args)


class Fp8QuantizedWeight(QuantizedWeight):
    """weight float8_e4m3fn [N, K]; weight_scale float32 [N] (per channel) or [N / bn, K / bk] (block_size)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None,
                 dynamic_activations: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.block_size = block_size
        self.dynamic_activations = dynamic_activations

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_weight(self.weight, self.weight_scale, self.block_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.weight, self.weight_scale, self.block_size, self.dynamic_activations)
        if x.device.type == "cpu" and kernels.kernel_backend(x) == "torch":
            return fp8_matmul_cpu(x, *args, linear=linear)  # W8A16 on CPU: equals the grid reference
        return kernels.fp8_quant_matmul(x, *args)
