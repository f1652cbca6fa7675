"""Writes a step's new keys and values into the paged KV pool at their flat slots (block * block_size + offset;
-1 marks a padding token): the torch reference and its Triton kernel, in one file as for the other small ops.
"""
from __future__ import annotations

import torch

from rayinfer.kernels.triton_compat import tl, triton


def write_kv_reference(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores key/value [T, Hkv, D] at flat slots (block * block_size + offset); slot -1 marks padding."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


# Grid (T, Hkv): one program copies one head-row of K and of V into its pool slot, and returns at slot -1.
@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
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
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
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
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs_d * stride_kd, mask=d_mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs_d * stride_vd, mask=d_mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kco + head * stride_kch + offs_d * stride_kcd
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vco + head * stride_vch + offs_d * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=d_mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=d_mask)


def write_kv_triton(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
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
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_cache.shape[1],
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


__all__ = ["write_kv_reference", "write_kv_triton"]
