"""RMSNorm (optionally fused with the residual add that precedes it) and LayerNorm."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from rayinfer.kernels.triton_compat import tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, statistics in float32."""
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton versions. One program normalises one row. Rows up to _MAX_FUSED_BLOCK features are held in registers
# (one read of the inputs); longer rows loop over chunks and read the inputs again for the second pass.
# Every rounding step of the references is kept (sum rounded to its dtype, normalised value rounded to the
# input dtype before the weight multiply), so results differ from them only by float32 summation order.
# ---------------------------------------------------------------------------------------------------------------
# Set (or monkeypatch) to fill freshly allocated outputs with NaN before the launch: unwritten elements show up.
NAN_FILL_OUTPUTS: bool = os.environ.get("RAYINFER_KERNEL_NAN_FILL", "") == "1"
_MAX_FUSED_BLOCK = 8192


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if NAN_FILL_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., H] -> [T, H] with unit feature stride (a view when the layout allows one)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_launch(hidden: int) -> tuple[int, bool, int]:
    """(BLOCK_H, ONE_BLOCK, num_warps) for a row of `hidden` features."""
    block = min(triton.next_power_of_2(hidden), _MAX_FUSED_BLOCK)
    one_block = block >= hidden
    num_warps = min(max(block // 256, 1), 16)
    return block, one_block, num_warps


def _check_vector(name: str, t: torch.Tensor | None, hidden: int) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != hidden):
        raise ValueError(f"{name} must have shape [{hidden}] to match the last dim of x (got {list(t.shape)})")


@triton.jit
def _rms_input(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """The row chunk the statistics are taken over, in its own dtype: x, or x + residual rounded as torch does."""
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_row.dtype.element_ty)
        if STORE_SUM:
            tl.store(res_out_row + cols, s, mask=mask)
        return s
    else:
        return x


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_row_stride,
    res_row_stride,
    out_row_stride,
    res_out_row_stride,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    res_out_row = res_out_ptr + row * res_out_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_H)
    if ONE_BLOCK:
        mask = cols < H
        s = _rms_input(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL, True)
        v = s.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(v * v, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (v * rstd).to(s.dtype).to(tl.float32) * w
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            mask = start + cols < H
            v = _rms_input(x_row, res_row, res_out_row, start + cols, mask, HAS_RESIDUAL, True).to(tl.float32)
            acc += v * v
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / H + eps)
        for start in range(0, H, BLOCK_H):
            mask = start + cols < H
            # Recomputed from the inputs (never re-read from the sum just stored): outputs do not alias inputs.
            s = _rms_input(x_row, res_row, res_out_row, start + cols, mask, HAS_RESIDUAL, False)
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32) * w
            tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    _check_vector("weight", weight, hidden)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {list(residual.shape)} must equal x shape {list(x.shape)}")
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = _new_output(tuple(x.shape), torch.promote_types(weight.dtype, sum_dtype), x.device)
    new_residual = None if residual is None else _new_output(tuple(x.shape), sum_dtype, x.device)
    rows = x.numel() // hidden if hidden else 0
    if rows == 0 or hidden == 0:
        return out, new_residual
    x2 = _as_rows(x, hidden)
    out2 = out.view(-1, hidden)
    res2 = x2 if residual is None else _as_rows(residual, hidden)
    res_out2 = out2 if new_residual is None else new_residual.view(-1, hidden)
    block, one_block, num_warps = _row_launch(hidden)
    _rms_norm_kernel[(rows,)](
        x2,
        res2,
        weight.contiguous(),
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block,
        ONE_BLOCK=one_block,
        num_warps=num_warps,
    )
    return out, new_residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same result dtype as the reference (weight's dtype promoted with x's)."""
    return _rms_norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: (rms_norm(x + residual), x + residual). Inputs are left unchanged, as by the reference."""
    out, new_residual = _rms_norm_launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    H,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_H)
    if ONE_BLOCK:
        mask = cols < H
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / H
        centred = tl.where(mask, v - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / H + eps)
        y = centred * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            mask = start + cols < H
            acc += tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            mask = start + cols < H
            v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, v - mean, 0.0)
            acc += centred * centred
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / H + eps)
        for start in range(0, H, BLOCK_H):
            mask = start + cols < H
            v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * rstd * tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Triton LayerNorm over the last dim; statistics in float32, result in x's dtype."""
    hidden = x.shape[-1]
    _check_vector("weight", weight, hidden)
    _check_vector("bias", bias, hidden)
    out = _new_output(tuple(x.shape), x.dtype, x.device)
    rows = x.numel() // hidden if hidden else 0
    if rows == 0 or hidden == 0:
        return out
    x2 = _as_rows(x, hidden)
    out2 = out.view(-1, hidden)
    w = weight.contiguous()
    block, one_block, num_warps = _row_launch(hidden)
    _layer_norm_kernel[(rows,)](
        x2,
        w,
        w if bias is None else bias.contiguous(),
        out2,
        x2.stride(0),
        out2.stride(0),
        hidden,
        float(eps),
        HAS_BIAS=bias is not None,
        BLOCK_H=block,
        ONE_BLOCK=one_block,
        num_warps=num_warps,
    )
    return out
