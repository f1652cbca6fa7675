"""Rotary position embedding applied in place to q and k, from cos/sin tables indexed by position."""
from __future__ import annotations

import torch

from rayinfer.kernels.triton_compat import tl, triton


def rotary_embedding_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first `rot_dim = 2 * cos_cache.shape[1]` features of every head of q [T, Hq, D] and k [T, Hk, D].

    cos_cache/sin_cache: [N, rot_dim / 2] float32, row `positions[t]` for token t. Neox style pairs feature i with
    i + rot_dim/2; GPT-J style pairs 2i with 2i + 1. Math in float32, written back in the input dtype.
    """
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    half = cos_cache.shape[1]
    for x in (q, k):
        rot = x[..., : 2 * half].float()
        if is_neox:
            first, second = rot[..., :half], rot[..., half:]
        else:
            first, second = rot[..., 0::2], rot[..., 1::2]
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        if is_neox:
            rotated = torch.cat((new_first, new_second), dim=-1)
        else:
            rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
        x[..., : 2 * half] = rotated.to(x.dtype)
    return q, k


# ---------------------------------------------------------------------------------------------------------------
# Triton version. Grid (T, q head blocks + k head blocks): each program loads its token's cos/sin row once and
# rotates BLOCK_HEADS heads of q or of k in place. Only the rot_dim rotated features are read or written, through
# the tensors' own strides, so q/k may be views into a fused qkv buffer.
# ---------------------------------------------------------------------------------------------------------------
_MAX_TILE = 2048  # BLOCK_HEADS * BLOCK_HALF elements per operand held by one program (~60 registers at 8 warps)


@triton.jit
def _rotate_heads(
    base,
    stride_h,
    stride_d,
    head_start,
    num_heads,
    cos,
    sin,
    half,
    d,
    d_mask,
    IS_NEOX: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = head_start + tl.arange(0, BLOCK_HEADS)
    head_mask = (heads < num_heads)[:, None]
    head_ptrs = base + heads[:, None] * stride_h
    c = cos[None, :]
    s = sin[None, :]
    if IS_NEOX:  # feature i pairs with i + half: two contiguous half-rows
        mask = head_mask & d_mask[None, :]
        first_ptrs = head_ptrs + d[None, :] * stride_d
        second_ptrs = head_ptrs + (d + half)[None, :] * stride_d
        x1 = tl.load(first_ptrs, mask=mask, other=0.0)
        x2 = tl.load(second_ptrs, mask=mask, other=0.0)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        tl.store(first_ptrs, (f1 * c - f2 * s).to(x1.dtype), mask=mask)
        tl.store(second_ptrs, (f2 * c + f1 * s).to(x2.dtype), mask=mask)
    else:  # GPT-J: feature 2i pairs with 2i + 1; one contiguous row, de-interleaved in registers
        rot = tl.arange(0, 2 * BLOCK_HALF)
        mask = head_mask & (rot < 2 * half)[None, :]
        ptrs = head_ptrs + rot[None, :] * stride_d
        x = tl.load(ptrs, mask=mask, other=0.0)
        f1, f2 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_HEADS, BLOCK_HALF, 2)))
        rotated = tl.join(f1 * c - f2 * s, f2 * c + f1 * s)
        tl.store(ptrs, tl.reshape(rotated, (BLOCK_HEADS, 2 * BLOCK_HALF)).to(x.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    pos_stride,
    q_stride_t,
    q_stride_h,
    q_stride_d,
    k_stride_t,
    k_stride_h,
    k_stride_d,
    cos_stride_n,
    cos_stride_d,
    sin_stride_n,
    sin_stride_d,
    num_q_heads,
    num_k_heads,
    half,
    q_blocks,
    IS_NEOX: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    pos = tl.load(pos_ptr + token * pos_stride).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    cos = tl.load(cos_ptr + pos * cos_stride_n + d * cos_stride_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * sin_stride_n + d * sin_stride_d, mask=d_mask, other=0.0).to(tl.float32)
    if head_block < q_blocks:
        _rotate_heads(
            q_ptr + token * q_stride_t, q_stride_h, q_stride_d, head_block * BLOCK_HEADS, num_q_heads,
            cos, sin, half, d, d_mask, IS_NEOX, BLOCK_HEADS, BLOCK_HALF,
        )
    else:
        _rotate_heads(
            k_ptr + token * k_stride_t, k_stride_h, k_stride_d, (head_block - q_blocks) * BLOCK_HEADS, num_k_heads,
            cos, sin, half, d, d_mask, IS_NEOX, BLOCK_HEADS, BLOCK_HALF,
        )


def rotary_embedding_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary embedding, in place on q [T, Hq, D] and k [T, Hk, D] (any strides); returns (q, k)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [tokens, heads, head_dim] (got {list(q.shape)} and {list(k.shape)})")
    tokens = q.shape[0]
    half = cos_cache.shape[1]
    if k.shape[0] != tokens or positions.numel() != tokens:
        counts = (tokens, k.shape[0], positions.numel())
        raise ValueError(f"q, k and positions disagree on the token count {counts}")
    if sin_cache.shape != cos_cache.shape:
        raise ValueError(f"sin_cache {list(sin_cache.shape)} and cos_cache {list(cos_cache.shape)} differ in shape")
    if 2 * half > min(q.shape[2], k.shape[2]):
        raise ValueError(f"rot_dim {2 * half} exceeds the head dim of q ({q.shape[2]}) or k ({k.shape[2]})")
    if tokens == 0 or half == 0:
        return q, k
    positions = positions.reshape(-1)
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(max(q.shape[1], k.shape[1], 1)), max(1, _MAX_TILE // block_half))
    q_blocks = triton.cdiv(q.shape[1], block_heads)
    k_blocks = triton.cdiv(k.shape[1], block_heads)
    if q_blocks + k_blocks == 0:
        return q, k
    _rotary_kernel[(tokens, q_blocks + k_blocks)](
        positions,
        q,
        k,
        cos_cache,
        sin_cache,
        positions.stride(0),
        *q.stride(),
        *k.stride(),
        *cos_cache.stride(),
        *sin_cache.stride(),
        q.shape[1],
        k.shape[1],
        half,
        q_blocks,
        IS_NEOX=bool(is_neox),
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
        num_warps=min(max(block_heads * block_half // 256, 1), 8),
    )
    return q, k
