"""Paged attention of a mixed step as one Triton launch: the kernel and its launcher, giving the results of
`attention_reference.paged_attention_reference` (same arguments and pool layout) without gathering K/V copies or
splitting the step into per-sequence calls. Split-KV's policy and merge live in `attention_split_kv`.
"""
from __future__ import annotations

import torch

from rayinfer.kernels.attention_split_kv import choose_num_splits, reduce_splits
from rayinfer.kernels.kv_quant import check_scales, is_quantized
from rayinfer.kernels.triton_compat import tl, triton


# ----------------------------------------------------------------------------------------------------------------
# paged_attention: one launch for the whole mixed step, grid (query tiles, Hkv, num_splits).
#   * Rows of a tile pack (query token, head of the GQA group): row m is token `m // GROUP` of the tile and query
#     head `kv_head * GROUP + m % GROUP`, so the BLOCK_M x D query tile holds BLOCK_Q = BLOCK_M // GROUP tokens and
#     every K/V tile gathered from the pool is used by the whole group (loaded once, no repeat_interleave).
#   * Query tiles of all sequences are laid out on one flat axis without a host sync: sequence i owns tiles
#     [query_start_loc[i] // BLOCK_Q + i, query_start_loc[i + 1] // BLOCK_Q + i + 1), which is at least
#     cdiv(query_len_i, BLOCK_Q) of them; a program finds its sequence by binary search over query_start_loc and
#     returns at once when its tile lies past the chunk. Grid size: T // BLOCK_Q + num_seqs.
#   * KV is walked in BLOCK_N-token tiles, each token gathered through the block table (any block_size), with an
#     online softmax in float32 (log2 domain, exp2). Only tiles between the window start of the tile's first query
#     and the causal end of its last query are visited.
#   * Split-KV (flash-decoding): with num_splits > 1 the visited tile range of every query tile is cut into
#     num_splits contiguous parts (works for prefill chunks and decodes alike); each part writes its running max,
#     sum and unnormalised accumulator to float32 scratch, and `attention_split_kv.reduce_splits` merges them.
#   * A quantised pool (fp8 e4m3 / int8 codes, `kv_quant`) is read as codes: each K/V tile is dequantised in
#     registers by its rows' float32 scales, so the pool is read at 1 byte per element plus 4 per row and head.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh from exp (no libdevice, so it also runs in the interpreter); exact to ~1 ulp of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    alibi_ptr,
    k_scales_ptr,
    v_scales_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    num_seqs,
    num_tokens,
    num_heads,
    num_splits,
    block_size,
    scale,
    soft_cap,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bts,
    stride_btb,
    stride_sb,
    stride_so,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence owns this tile: the last i with query_start_loc[i] // BLOCK_Q + i <= tile_id.
    lo = tile_id * 0
    hi = num_seqs - 1 + tile_id * 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        found = first_tile <= tile_id
        lo = tl.where(found, mid, lo)
        hi = tl.where(found, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first_token = (tile_id - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # of this tile, within the chunk
    if first_token >= q_len:
        return
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    token = first_token + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = context_len + token
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    row = (q_start + token).to(tl.int64)
    q_ptrs = q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)

    # Keys this tile can see: causal end of its last query, window start of its first query.
    kv_end = context_len + tl.minimum(first_token + BLOCK_Q, q_len)
    kv_begin = tile_id * 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(context_len + first_token - sliding_window + 1, 0)
    kv_begin = (kv_begin // BLOCK_N) * BLOCK_N
    if SPLIT:
        tiles_per_split = tl.cdiv(tl.cdiv(kv_end - kv_begin, BLOCK_N), num_splits)
        kv_begin = kv_begin + split * tiles_per_split * BLOCK_N
        kv_end = tl.minimum(kv_end, kv_begin + tiles_per_split * BLOCK_N)

    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start in range(kv_begin, kv_end, BLOCK_N):
        k_pos = start + offs_n
        k_valid = k_pos < kv_end
        block = tl.load(block_table + (k_pos // block_size) * stride_btb, mask=k_valid, other=0).to(tl.int64)
        in_block = (k_pos % block_size).to(tl.int64)
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k_rows = block * stride_kb + in_block * stride_ko + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        scale_rows = block * stride_sb + in_block * stride_so + kv_head * stride_sh  # unused unless KV_QUANT
        if KV_QUANT:  # codes * their row's scale, in q's dtype (as kv_quant.dequantize)
            k_scale = tl.load(k_scales_ptr + scale_rows, mask=k_valid, other=0.0)
            k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
        if DOT_UPCAST:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] float32
        if HAS_SOFTCAP:
            s = soft_cap * _tanh(s * (scale / soft_cap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        if HAS_ALIBI:
            s += slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if HAS_WINDOW:
            visible = visible & ((q_pos[:, None] - k_pos[None, :]) < sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = block * stride_vb + in_block * stride_vo + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if KV_QUANT:
            v_scale = tl.load(v_scales_ptr + scale_rows, mask=k_valid, other=0.0)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        if DOT_UPCAST:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_valid[:, None] & d_mask[None, :]
    if SPLIT:
        part = (split * num_tokens + row) * num_heads + head
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


# Triton's interpreter multiplies the raw uint16 bits of bfloat16 operands in tl.dot (triton 3.9), so there, and
# only there, bfloat16 dots run on float32 copies of the same values. Compiled kernels keep bfloat16 tensor-core dots.
_INTERPRETED = type(_paged_attention_kernel).__name__ == "InterpretedFunction"


def _tile_config(head_dim_pad: int, group: int, max_query_len: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) sized to the step: decode-only steps get the smallest M tile that
    tl.dot accepts (16 rows, or the group if larger); prefill rows up to 128 (64 for head_dim 256 or float32, whose
    tiles are 2x larger in shared memory)."""
    wide = head_dim_pad > 128 or dtype == torch.float32
    m_cap = 64 if wide else 128
    if dtype == torch.float32 and head_dim_pad > 128:
        m_cap = 32
    block_m = max(16, triton.next_power_of_2(group), min(triton.next_power_of_2(max_query_len * group), m_cap))
    block_n = 32 if wide else 64
    num_warps = 8 if block_m * head_dim_pad >= 128 * 128 else 4
    return block_m, block_n, num_warps, 2


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `paged_attention_reference`, one launch per step (plus a reduce launch on the split-KV path).

    max_query_len / max_seq_len: host ints (read from the device only when not given). num_splits: forces the
    split-KV path with that many parts (1: never split); None lets the heuristic choose. out: optional [T, Hq, D]
    destination (rows of tokens that belong to no sequence are left as they are). k_scales / v_scales: the scales
    of a quantised (fp8 / int8) pool, dequantised per K/V tile as it is loaded.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q head_dim {head_dim} does not match caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    check_scales(k_cache, k_scales, "k_scales")
    check_scales(v_cache, v_scales, "v_scales")
    kv_quant = is_quantized(k_cache)
    if kv_quant and (v_cache.dtype != k_cache.dtype or k_scales.stride() != v_scales.stride()):
        raise ValueError("quantised K and V pools must share one dtype and one scale layout")
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    max_query_len = max(1, max_query_len)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _tile_config(head_dim_pad, group, max_query_len, q.dtype)
    block_q = block_m // group
    num_q_tiles = num_tokens // block_q + num_seqs  # upper bound; programs past their chunk return at once

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        busy = min(num_q_tiles, num_seqs * triton.cdiv(max_query_len, block_q)) * num_kv_heads
        num_splits = choose_num_splits(busy, max_seq_len, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 (got {num_splits})")
    split = num_splits > 1
    if split:
        part_m = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        alibi_slopes if alibi_slopes is not None else q,
        k_scales if kv_quant else q,
        v_scales if kv_quant else q,
        part_m,
        part_l,
        part_acc,
        num_seqs,
        num_tokens,
        num_heads,
        num_splits,
        block_size,
        float(scale),
        float(soft_cap) if soft_cap is not None else 0.0,
        int(sliding_window) if sliding_window is not None else 0,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *block_tables.stride(),
        *(k_scales.stride() if kv_quant else (0, 0, 0)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=soft_cap is not None,
        HAS_ALIBI=alibi_slopes is not None,
        SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=_INTERPRETED and q.dtype == torch.bfloat16,
        KV_QUANT=kv_quant,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        reduce_splits(part_m, part_l, part_acc, out, query_start_loc[num_seqs:])
    return out


__all__ = ["paged_attention_triton"]
