"""Triton y = x @ W.T for quantised weights, dequantised in registers (W is never written to memory).

One kernel source serves both weight layouts (`quant_matmul.py`'s packed integers, `fp8_matmul.py`'s e4m3) and
compiles into two shapes of reduction:
  GEMM (USE_DOT): [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles through tl.dot, for prefill (M > GEMV_MAX_ROWS);
  GEMV: the same tiles reduced with a broadcast multiply and tl.sum over K, for decode batches of at most
        GEMV_MAX_ROWS rows, where tl.dot would pad M to 16 and the dequantisation, not the math, is the cost.
Both split K over a third grid axis when the M x N tiles alone would leave the device's SMs idle (decode); each
split writes float32 partial sums that are added afterwards (deterministic, unlike atomics).

The dequantised tile is rounded to x's dtype before the multiply, as the references round W, and accumulated in
float32. int_quant_matmul_triton is the integer entry point; the FP8 one is in fp8_matmul.py.
"""
from __future__ import annotations

import functools

import torch

from rayinfer.kernels.quant_matmul import check_activations, check_int_weight
from rayinfer.kernels.triton_compat import tl, triton

GEMV_MAX_ROWS = 4
# The GEMV's [BLOCK_M, BLOCK_K, BLOCK_N] product lives in registers: this many float32 values per program.
GEMV_TILE_ELEMENTS = 8192
MAX_SPLIT_K = 16


@triton.jit
def _e4m3_bits_to_float(bits):
    """float8 e4m3fn bytes (uint8) to float32 by arithmetic, for devices without fp8 conversions: the 7 low bits
    shifted into a float16's exponent and mantissa give the value times 2**-8 exactly, subnormals included. The NaN
    code (0x7F) decodes as 480; clamped quantisation and finite checkpoints never produce it."""
    wide = bits.to(tl.uint16)
    half_bits = (((wide & 0x80) << 8) | ((wide & 0x7F) << 7)).to(tl.uint16)  # the bitcast needs 16 bits exactly
    return half_bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _dequantized_tile(
    w_ptr, scale_ptr, zero_ptr, g_idx_ptr, offs_k, offs_n, k_start, k_hi, k_valid, n_valid,
    stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn, group_k, group_n,
    IS_FP8: tl.constexpr, BITS: tl.constexpr, FP8_AS_BITS: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """W.T's [BLOCK_K, BLOCK_N] tile in float32. Integer weights: rows k of packed int32 words (k // pack), the
    k % pack-th field of each; FP8: the bytes of W [N, K] read transposed. The scale (and zero) of element (k, n) is
    at group k // group_k (integers with act-order: g_idx[k]) and column n // group_n; SCALE_PER_TILE means the group
    is the same for the whole tile (group_k a multiple of BLOCK_K), so one row of scales is read, not a tile."""
    mask = k_valid[:, None] & n_valid[None, :]
    if IS_FP8:
        raw = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask, other=0.0)
        if FP8_AS_BITS:
            q = _e4m3_bits_to_float(raw)
        else:
            q = raw.to(tl.float32)
    else:
        PACK: tl.constexpr = 32 // BITS
        # One load per packed word, then its PACK fields side by side: [BLOCK_K // PACK, PACK, BLOCK_N] -> tile rows.
        # k_start is a multiple of PACK and K of PACK, so a word is wholly inside K or wholly outside.
        offs_word = k_start // PACK + tl.arange(0, BLOCK_K // PACK)
        word_valid = offs_word * PACK < k_hi
        words = tl.load(
            w_ptr + offs_word[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=word_valid[:, None] & n_valid[None, :],
            other=0,
        )
        shifts = tl.arange(0, PACK) * BITS
        fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(fields, (BLOCK_K, BLOCK_N)).to(tl.float32)
    scale_col = offs_n // group_n
    if SCALE_PER_TILE:
        group = k_start // group_k
        scale = tl.load(scale_ptr + group * stride_sk + scale_col * stride_sn, mask=n_valid, other=0.0)
        scale = scale.to(tl.float32)[None, :]
        if not IS_FP8:
            zero = tl.load(zero_ptr + group * stride_zk + offs_n * stride_zn, mask=n_valid, other=0)
            zero = zero.to(tl.float32)[None, :]
    else:
        if IS_FP8:
            group = offs_k // group_k
        else:
            group = tl.load(g_idx_ptr + offs_k, mask=k_valid, other=0)
        scale = tl.load(scale_ptr + group[:, None] * stride_sk + scale_col[None, :] * stride_sn, mask=mask, other=0.0)
        scale = scale.to(tl.float32)
        if not IS_FP8:
            zero = tl.load(zero_ptr + group[:, None] * stride_zk + offs_n[None, :] * stride_zn, mask=mask, other=0)
            zero = zero.to(tl.float32)
    # One return: the compiler goes on past a return inside a constexpr branch, to a `zero` FP8 never defines.
    if IS_FP8:
        tile = q * scale
    else:
        tile = (q - zero) * scale
    return tile


@triton.jit
def _quant_matmul_kernel(
    x_ptr, x_scale_ptr, w_ptr, scale_ptr, zero_ptr, g_idx_ptr, out_ptr,
    m_rows, n_out, k_in, k_per_split,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn, group_k, group_n,
    stride_os, stride_om, stride_on,
    IS_FP8: tl.constexpr, BITS: tl.constexpr, FP8_AS_BITS: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    ACT_QUANT: tl.constexpr, USE_DOT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y over split tl.program_id(2)'s share of K, written to out[split].

    ACT_QUANT: x holds e4m3 activations (bytes when FP8_AS_BITS) and x_scale their per-row scales, applied to the
    float32 sums (exact fp8 values times their row's scale, as the reference's x_q * x_scale)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    n_valid = offs_n < n_out
    m_valid = offs_m < m_rows
    rows = offs_m.to(tl.int64)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_in)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < k_hi
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        if ACT_QUANT:
            if FP8_AS_BITS:
                a = _e4m3_bits_to_float(a)
            a = a.to(COMPUTE_DTYPE)  # exact: every e4m3 value is a float16 / bfloat16 value
        w = _dequantized_tile(
            w_ptr, scale_ptr, zero_ptr, g_idx_ptr, offs_k, offs_n, k_start, k_hi, k_valid, n_valid,
            stride_wk, stride_wn, stride_sk, stride_sn, stride_zk, stride_zn, group_k, group_n,
            IS_FP8, BITS, FP8_AS_BITS, SCALE_PER_TILE, BLOCK_K, BLOCK_N,
        ).to(COMPUTE_DTYPE)
        if USE_DOT:
            if DOT_UPCAST:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if ACT_QUANT:
        acc *= tl.load(x_scale_ptr + offs_m, mask=m_valid, other=0.0)[:, None]
    out = out_ptr + split * stride_os + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


# Triton's interpreter multiplies the raw bits of bfloat16 operands in tl.dot (see kernels/moe.py), so there, and only
# there, bfloat16 dots run on float32 copies of the same values.
_INTERPRETED = type(_quant_matmul_kernel).__name__ == "InterpretedFunction"
_TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs worth launching: two per SM on a GPU; a handful under the interpreter, so that small test shapes
    take the split-K path too."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def tile_config(m_rows: int, x_dtype: torch.dtype, group_k: int | None) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, use_dot) for M rows. BLOCK_K shrinks to the scale group along K when
    that is a smaller power of two, so each tile reads one row of scales."""
    if m_rows <= GEMV_MAX_ROWS:
        block_m = triton.next_power_of_2(max(m_rows, 1))
        block_n = 64
        block_k, num_warps, use_dot = GEMV_TILE_ELEMENTS // (block_m * block_n), 4, False
    else:
        block_m = 16 if m_rows <= 16 else 32 if m_rows <= 32 else 64
        block_n = 64 if m_rows <= 64 else 128
        block_k = 32 if x_dtype == torch.float32 else 64
        num_warps, use_dot = (4 if block_m * block_n <= 4096 else 8), True
    if group_k is not None and 16 <= group_k < block_k and group_k & (group_k - 1) == 0:
        block_k = group_k
    return block_m, block_n, block_k, num_warps, use_dot


def split_k(k_in: int, block_k: int, tiles_mn: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split, a multiple of block_k): enough splits that the M x N tiles fill the device."""
    k_tiles = triton.cdiv(k_in, block_k)
    split = max(1, min(k_tiles, MAX_SPLIT_K, _target_programs(device) // tiles_mn))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    return triton.cdiv(k_in, k_per_split), k_per_split  # recounted: no split left empty


def launch_quant_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    n_out: int,
    weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    weight_strides: tuple[int, int, int, int, int, int],
    group: tuple[int | None, int],
    is_fp8: bool,
    bits: int = 8,
    fp8_as_bits: bool = False,
) -> torch.Tensor:
    """Runs the kernel for y [M, n_out] in out_dtype. weight: (w, scale, zero, g_idx) tensors (unused ones may be
    any tensor); weight_strides: (w along K, w along N, scale along its group axis, scale along N, zero along its
    group axis, zero along N); group: (group_k, group_n), group_k None for integer weights whose groups come from
    g_idx. x holds e4m3 activations when x_scale is given."""
    m_rows, k_in = x.shape
    y = torch.empty((m_rows, n_out), dtype=out_dtype, device=x.device)
    if m_rows == 0 or n_out == 0:
        return y
    group_k, group_n = group
    block_m, block_n, block_k, num_warps, use_dot = tile_config(m_rows, out_dtype, group_k)
    # One scale row per tile when tiles never straddle a group (or there is one group along K).
    scale_per_tile = group_k is not None and (group_k % block_k == 0 or group_k >= k_in)
    tiles_mn = triton.cdiv(m_rows, block_m) * triton.cdiv(n_out, block_n)
    split, k_per_split = split_k(k_in, block_k, tiles_mn, x.device)
    out = y if split == 1 else torch.empty((split, m_rows, n_out), dtype=torch.float32, device=x.device)
    stride_os = 0 if split == 1 else out.stride(0)
    w, scale, zero, g_idx = weight
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(m_rows, block_m), split)
    _quant_matmul_kernel[grid](
        x, x_scale if x_scale is not None else scale, w, scale, zero, g_idx, out,
        m_rows, n_out, k_in, k_per_split,
        x.stride(0), x.stride(1), *weight_strides, group_k if group_k is not None else k_in, group_n,
        stride_os, out.stride(-2), out.stride(-1),
        IS_FP8=is_fp8, BITS=bits, FP8_AS_BITS=fp8_as_bits, SCALE_PER_TILE=scale_per_tile,
        ACT_QUANT=x_scale is not None, USE_DOT=use_dot, COMPUTE_DTYPE=getattr(tl, _TL_DTYPES[out_dtype]),
        DOT_PRECISION="ieee" if out_dtype == torch.float32 else "tf32",
        DOT_UPCAST=_INTERPRETED and out_dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    if split > 1:
        y.copy_(out.sum(dim=0))
    return y


def int_quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """Triton `int_quant_matmul_reference`. Pass group_size when g_idx is k // group_size (no act-order; -1 style
    single groups as group_size = K): scales are then read one row per tile instead of gathered per element."""
    k_in, n_out = check_int_weight(qweight, scales, zeros, g_idx, bits)
    check_activations(x, k_in)
    if group_size is not None and (group_size <= 0 or triton.cdiv(k_in, group_size) != scales.shape[0]):
        raise ValueError(f"group_size {group_size} does not give the {scales.shape[0]} scale groups over K = {k_in}")
    return launch_quant_matmul(
        x, None, x.dtype, n_out,
        (qweight, scales, zeros, g_idx),
        (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1)),
        (group_size, 1), is_fp8=False, bits=bits,
    )
