"""Gated activations: the first half of the last dim is the gate, the second half the value."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from rayinfer.kernels.triton_compat import tl, triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """approximate: "none" (exact erf GELU) or "tanh"."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


# ---------------------------------------------------------------------------------------------------------------
# Triton versions. Grid (rows, column blocks of the output): each program reads BLOCK gate and BLOCK value
# features of one row and writes BLOCK outputs. The activation is computed in float32 and rounded to the input
# dtype before the multiply, as the references (two torch ops) do.
# ---------------------------------------------------------------------------------------------------------------
# Set (or monkeypatch) to fill freshly allocated outputs with NaN before the launch: unwritten elements show up.
NAN_FILL_OUTPUTS: bool = os.environ.get("RAYINFER_KERNEL_NAN_FILL", "") == "1"
_MAX_BLOCK = 1024
_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _gated_activation_kernel(
    x_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    d,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if ACTIVATION == 0:  # silu
        act = g * tl.sigmoid(g)
    elif ACTIVATION == 1:  # exact gelu
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # tanh gelu: 0.5 * g * (1 + tanh(z)) == g * sigmoid(2z), which keeps to core Triton ops
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * tl.sigmoid(2.0 * z)
    act = act.to(gate.dtype).to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _gated_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"the last dim of x must be even (gate and value halves); got {width}")
    d = width // 2
    shape = (*x.shape[:-1], d)
    if NAN_FILL_OUTPUTS:
        out = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // d if d else 0
    if rows == 0:
        return out
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, d)
    block = min(triton.next_power_of_2(d), _MAX_BLOCK)
    _gated_activation_kernel[(rows, triton.cdiv(d, block))](
        x2,
        out2,
        x2.stride(0),
        out2.stride(0),
        d,
        ACTIVATION=_ACTIVATIONS[activation],
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 4),
    )
    return out


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton silu(x[..., :d]) * x[..., d:]."""
    return _gated_activation(x, "silu")


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Triton gelu(x[..., :d], approximate) * x[..., d:]; approximate is "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh' (got {approximate!r})")
    return _gated_activation(x, "gelu" if approximate == "none" else "gelu_tanh")
