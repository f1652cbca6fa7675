"""Quantised KV cache codes: fp8 (e4m3) or int8 values with one float32 scale per (pool slot, KV head).

A head's vector x of one token is stored as codes round(x / s), s = amax(|x|) / QMAX (448 for e4m3, 127 for int8),
or s a static scale from the checkpoint (codes then saturate at +-QMAX); it reads back as codes * s. The torch
functions here are the reference that the Triton write kernel and every attention path must match; the jitted
helpers are the kernels' side of the same arithmetic.

Scales are float32, not float16: they are 4 bytes per head row (3% of an fp8 row at head_dim 128), and float16
would turn amax / 448 of small activations (amax < 0.03) subnormal and coarse, costing the accuracy the codes keep.
"""
from __future__ import annotations

import torch

from rayinfer.kernels.triton_compat import tl, triton

FP8_DTYPE = torch.float8_e4m3fn
QUANT_MAX = {FP8_DTYPE: 448.0, torch.int8: 127.0}
# Floor of a computed scale, so an all-zero vector divides by it (and stays zero) instead of making NaN.
MIN_SCALE = 1e-12


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype in QUANT_MAX


def check_scales(cache: torch.Tensor, scales: torch.Tensor | None, name: str) -> None:
    """A quantised pool needs its [num_blocks, block_size, Hkv] float32 scales; a float pool takes none."""
    if not is_quantized(cache):
        if scales is not None:
            raise ValueError(f"{name} given for a {cache.dtype} cache, which is not quantised")
        return
    if scales is None or scales.shape != cache.shape[:3] or scales.dtype != torch.float32:
        got = None if scales is None else (tuple(scales.shape), scales.dtype)
        raise ValueError(f"a {cache.dtype} cache {tuple(cache.shape)} needs float32 {name} of shape "
                         f"{tuple(cache.shape[:3])} (got {got})")


def check_static_scale(static: torch.Tensor | None, num_kv_heads: int) -> None:
    """A static scale is one value for the layer or one per KV head (of this rank)."""
    if static is not None and static.numel() not in (1, num_kv_heads):
        raise ValueError(f"a static KV scale has 1 or {num_kv_heads} (one per KV head) elements (got {static.numel()})")


def dynamic_scales(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """[T, H, D] -> [T, H] float32: each head vector's amax over QMAX (floored at MIN_SCALE)."""
    amax = x.float().abs().amax(dim=-1)
    # Multiplying by the reciprocal, as the kernel does, keeps both bit-identical.
    return (amax * (1.0 / QUANT_MAX[cache_dtype])).clamp_min(MIN_SCALE)


def quantize(x: torch.Tensor, scales: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """[T, H, D] by scales [T, H] -> codes of cache_dtype, rounded half to even and saturated at +-QMAX."""
    qmax = QUANT_MAX[cache_dtype]
    y = (x.float() / scales[..., None]).clamp(-qmax, qmax)
    if cache_dtype == torch.int8:
        y = torch.round(y)
    return y.to(cache_dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] with scales [...] -> values of `dtype` (computed in float32, then cast, as the kernels do)."""
    return (codes.float() * scales[..., None]).to(dtype)


@triton.jit
def round_half_even(y):
    """Nearest integer, ties to even, for |y| < 2^22: adding 1.5 * 2^23 leaves no fraction bits (IEEE rounds the
    sum), and works in the interpreter, which has no rint."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def round_to_e4m3(y):
    """y (float32, |y| <= 448) rounded half to even onto the e4m3 grid, still float32.

    Converting an on-grid value to float8e4nv is then exact everywhere: Triton's interpreter (3.9) rounds some
    values just under a power of two to half of it (127.9 -> 64), so the kernel must not leave rounding to the
    cast. The grid step is 2^(e - 3) for |y| in [2^e, 2^(e+1)), and 2^-9 below 2^-6 (e4m3's subnormals)."""
    a = tl.abs(y)
    exponent = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    step_exponent = tl.maximum(exponent, 127 - 6) - 3
    step = (step_exponent << 23).to(tl.float32, bitcast=True)
    inverse_step = ((254 - step_exponent) << 23).to(tl.float32, bitcast=True)
    rounded = round_half_even(a * inverse_step) * step  # both products by powers of two: exact
    negative = y.to(tl.int32, bitcast=True) < 0  # the sign bit, so -0.0 keeps its sign as torch's cast does
    return tl.where(negative, -rounded, rounded)


@triton.jit
def quantize_codes(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """x (float32) / scale, saturated at +-QMAX and rounded onto the code grid; float32, ready to cast."""
    y = tl.math.div_rn(x, scale)  # IEEE division, as torch's; plain `/` on a GPU is approximate
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8:
        y = round_to_e4m3(y)
    else:
        y = round_half_even(y)
    return y


__all__ = [
    "FP8_DTYPE",
    "MIN_SCALE",
    "QUANT_MAX",
    "check_scales",
    "check_static_scale",
    "dequantize",
    "dynamic_scales",
    "is_quantized",
    "quantize",
    "quantize_codes",
    "round_half_even",
    "round_to_e4m3",
]
