"""Writes a step's new keys and values into the paged KV pool at their flat slots (block * block_size + offset;
-1 marks a padding token): the torch reference and its Triton kernel, in one file as for the other small ops.

A quantised pool (fp8 / int8, see `kv_quant`) also takes its scale pools [num_blocks, block_size, Hkv]: each written
head row gets its scale there (amax / QMAX, or the layer's static scale when one is given) and its codes in the
cache. A static scale is a float32 tensor of one element (per layer) or Hkv elements (per head).
"""
from __future__ import annotations

import torch

from rayinfer.kernels.kv_quant import (
    FP8_DTYPE,
    QUANT_MAX,
    check_scales,
    check_static_scale,
    dynamic_scales,
    is_quantized,
    quantize,
    quantize_codes,
)
from rayinfer.kernels.triton_compat import tl, triton


def _row_scales(x: torch.Tensor, cache: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
    """[T, Hkv] scales of the rows being written: the static scale broadcast, else computed from the rows."""
    if static is None:
        return dynamic_scales(x, cache.dtype)
    check_static_scale(static, x.shape[1])
    return static.float().reshape(-1).expand(x.shape[1]).expand(x.shape[0], -1)


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores key/value [T, Hkv, D] at flat slots (block * block_size + offset); slot -1 marks padding.

    k_scales / v_scales: the scale pools of a quantised cache; k_scale / v_scale: optional static scales."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    for x, cache, scales, static, name in ((key, k_cache, k_scales, k_scale, "k_scales"),
                                           (value, v_cache, v_scales, v_scale, "v_scales")):
        check_scales(cache, scales, name)
        if is_quantized(cache):
            row_scales = _row_scales(x, cache, static)
            scales.view(-1, num_kv_heads).index_copy_(0, slot_mapping, row_scales)
            x = quantize(x, row_scales, cache.dtype)
        rows = cache.view(-1, num_kv_heads, head_dim)
        if rows.dtype == FP8_DTYPE:  # torch has no index_copy_ for float8: move the bytes
            rows, x = rows.view(torch.uint8), x.view(torch.uint8)
        rows.index_copy_(0, slot_mapping, x.to(rows.dtype))


@triton.jit
def _write_row(x_ptr, cache_ptr, scales_ptr, static_ptr, token, head, block, offset, offs_d, d_mask,
               stride_xt, stride_xh, stride_xd, stride_cb, stride_co, stride_ch, stride_cd,
               stride_sb, stride_so, stride_sh, static_stride,
               QUANT: tl.constexpr, STATIC: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """One head row of K or V into its slot: as is, or as codes with its scale."""
    x = tl.load(x_ptr + token * stride_xt + head * stride_xh + offs_d * stride_xd, mask=d_mask, other=0.0)
    dst = cache_ptr + block * stride_cb + offset * stride_co + head * stride_ch + offs_d * stride_cd
    if QUANT:
        x = x.to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr + head * static_stride).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 0) * (1.0 / QMAX), 1e-12)  # kv_quant.dynamic_scales
        tl.store(scales_ptr + block * stride_sb + offset * stride_so + head * stride_sh, scale)
        x = quantize_codes(x, scale, QMAX, IS_FP8)
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=d_mask)


# Grid (T, Hkv): one program writes one head-row of K and of V into its pool slot, and returns at slot -1.
@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scales_ptr,
    v_scales_ptr,
    k_static_ptr,
    v_static_ptr,
    k_static_stride,
    v_static_stride,
    block_size,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vco,
    stride_vch,
    stride_vcd,
    stride_sb,
    stride_so,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    QUANT: tl.constexpr,
    K_STATIC: tl.constexpr,
    V_STATIC: tl.constexpr,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    _write_row(key_ptr, k_cache_ptr, k_scales_ptr, k_static_ptr, token, head, block, offset, offs_d, d_mask,
               stride_kt, stride_kh, stride_kd, stride_kcb, stride_kco, stride_kch, stride_kcd,
               stride_sb, stride_so, stride_sh, k_static_stride, QUANT, K_STATIC, QMAX, IS_FP8)
    _write_row(value_ptr, v_cache_ptr, v_scales_ptr, v_static_ptr, token, head, block, offset, offs_d, d_mask,
               stride_vt, stride_vh, stride_vd, stride_vcb, stride_vco, stride_vch, stride_vcd,
               stride_sb, stride_so, stride_sh, v_static_stride, QUANT, V_STATIC, QMAX, IS_FP8)


def _static_arg(static: torch.Tensor | None, num_kv_heads: int, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, stride over heads) of a static scale: one value for the layer (stride 0) or one per head."""
    if static is None:
        return fallback, 0
    check_static_scale(static, num_kv_heads)
    return static.reshape(-1), 0 if static.numel() == 1 else 1


def write_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton `write_kv_reference`: key/value [T, Hkv, D] into flat slots; slot -1 is skipped on the device."""
    num_tokens = key.shape[0]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if key.shape[1:] != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not match the cache's (Hkv, D) = "
            f"{(num_kv_heads, head_dim)}"
        )
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"K and V caches differ in dtype ({k_cache.dtype}, {v_cache.dtype})")
    check_scales(k_cache, k_scales, "k_scales")
    check_scales(v_cache, v_scales, "v_scales")
    if num_tokens == 0:
        return
    quant = is_quantized(k_cache)
    if quant and k_scales.stride() != v_scales.stride():
        raise ValueError("k_scales and v_scales must share one layout")
    k_static, k_static_stride = _static_arg(k_scale if quant else None, num_kv_heads, key)
    v_static, v_static_stride = _static_arg(v_scale if quant else None, num_kv_heads, key)
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scales if quant else key,
        v_scales if quant else key,
        k_static,
        v_static,
        k_static_stride,
        v_static_stride,
        k_cache.shape[1],
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *(k_scales.stride() if quant else (0, 0, 0)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        QUANT=quant,
        K_STATIC=quant and k_scale is not None,
        V_STATIC=quant and v_scale is not None,
        QMAX=QUANT_MAX.get(k_cache.dtype, 0.0),
        IS_FP8=k_cache.dtype == FP8_DTYPE,
    )


__all__ = ["write_kv_reference", "write_kv_triton"]
