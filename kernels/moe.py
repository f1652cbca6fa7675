"""Mixture-of-experts MLP over routed tokens: each token goes through its top-k experts' SwiGLU MLPs, whose outputs
are summed with the routing weights.

Shapes (one tensor-parallel rank's share): x [T, H]; w_gate_up [E, 2I, H] (each expert's gate rows, then its up
rows); w_down [E, H, I]; topk_weights [T, K] (float32 or x's dtype); topk_ids [T, K] (distinct experts per token).
The result is [T, H] in x's dtype: sum over k of topk_weights[t, k] * down(silu(gate(x_t)) * up(x_t)) of expert
topk_ids[t, k].

Both versions group the (token, expert) assignments by expert (a stable sort of the flattened ids), so each
expert's weights are applied to one contiguous slice of assignments: the reference loops over experts (never
tokens); the Triton version is one grouped-GEMM kernel launched twice (gate/up fused with SiLU-and-multiply, then
down scaled by the routing weight).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from rayinfer.kernels.triton_compat import tl, triton


def _check_shapes(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor) -> None:
    num_experts, two_inter, hidden = w_gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"x {tuple(x.shape)} does not fit w_gate_up {tuple(w_gate_up.shape)} ([E, 2I, H] expected)")
    if tuple(w_down.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w_down {tuple(w_down.shape)} must be [E, H, I] = {(num_experts, hidden, two_inter // 2)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must be [T, K] with T = {x.shape[0]}")


def fused_moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Torch version: one pair of matmuls per expert over its slice of the assignments sorted by expert.

    Rounding follows transformers' experts: each expert's output times its weight is rounded to x's dtype and
    added into a zeroed output, experts in increasing id order."""
    _check_shapes(x, w_gate_up, w_down, topk_ids)
    num_experts = w_gate_up.shape[0]
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        gate, up = F.linear(x[rows], w_gate_up[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w_down[expert]) * weights[start : start + count, None]
        out.index_add_(0, rows, expert_out.to(out.dtype))
        start += count
    return out


# ---------------------------------------------------------------------------------------------------------------
# Triton version. The assignments sorted by expert are laid out in blocks of BLOCK_M rows, each expert's run padded
# to a whole number of blocks, so every block belongs to one expert (`block_expert`); padding rows hold the id
# `num_assignments` and are masked. The layout is built with device ops only (no host sync); the grid is an upper
# bound on the block count, and blocks past the last expert's run return at once.
# ---------------------------------------------------------------------------------------------------------------
# Set (or monkeypatch) to fill freshly allocated outputs with NaN before the launch: unwritten elements show up.
NAN_FILL_OUTPUTS: bool = os.environ.get("RAYINFER_KERNEL_NAN_FILL", "") == "1"


def expert_block_layout(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids, block_expert): sorted_ids [num_blocks * block_m] are flat assignment ids (t * K + k) grouped
    by expert, each expert's group padded with `num_assignments` to a multiple of block_m; block_expert
    [num_blocks] is the expert of each block, -1 for the blocks past the end."""
    flat_ids = topk_ids.reshape(-1).long()
    num_assignments = flat_ids.numel()
    device = flat_ids.device
    order = torch.argsort(flat_ids, stable=True)
    # Not bincount: on CUDA it reads the largest id back to the host, which a CUDA graph capture cannot contain.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat_ids[order]
    rank_in_expert = torch.arange(num_assignments, device=device) - start[sorted_experts]
    # Each non-empty expert adds at most one partial block to the ceil of the total.
    num_blocks = triton.cdiv(num_assignments, block_m) + min(num_experts, num_assignments)
    sorted_ids = torch.full((num_blocks * block_m,), num_assignments, dtype=torch.int64, device=device)
    sorted_ids[padded_start[sorted_experts] + rank_in_expert] = order
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_assignments,
    n_out,
    k_in,
    a_row_divisor,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C for a block of assignments that share an expert.

    Row r of the block is assignment `a = sorted_ids[r]`; it reads A's row a // a_row_divisor (the token, for the
    gate/up pass over x; the assignment itself, for the down pass) and writes C's row a. B is [E, N, K] (the
    expert's weight, used transposed). GATED: B holds 2N rows (gate, then up) and C = silu(A B_gate^T) * (A B_up^T);
    otherwise C = (A B^T) * weights[a]. Intermediate results are rounded to C's dtype where torch would round them.
    """
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ids_ptr + offs_m)
    row_valid = assignment < num_assignments
    a_rows = (assignment // a_row_divisor).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < n_out
    b_expert = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, k_in, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < k_in
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        b_mask = k_valid[:, None] & n_valid[None, :]
        b_tile = b_expert + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
        b = tl.load(b_tile, mask=b_mask, other=0.0)
        if DOT_UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_tile + n_out * stride_bn, mask=b_mask, other=0.0)
            if DOT_UPCAST:
                acc_up += tl.dot(a.to(tl.float32), b_up.to(tl.float32), input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up, input_precision=DOT_PRECISION)
    out_dtype = c_ptr.dtype.element_ty
    if GATED:
        gate = acc.to(out_dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(out_dtype).to(tl.float32)
        result = act * acc_up.to(out_dtype).to(tl.float32)
    else:
        weight = tl.load(weights_ptr + assignment, mask=row_valid, other=0.0).to(tl.float32)
        result = acc.to(out_dtype).to(tl.float32) * weight[:, None]
    c_ptrs = c_ptr + assignment.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, result.to(out_dtype), mask=row_valid[:, None] & n_valid[None, :])


# Triton's interpreter multiplies the raw bits of bfloat16 operands in tl.dot (see kernels/attention_triton.py), so there,
# and only there, bfloat16 dots run on float32 copies of the same values.
_INTERPRETED = type(_grouped_gemm_kernel).__name__ == "InterpretedFunction"


def _tile_config(num_assignments: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small M tiles for decode steps (few rows per expert)."""
    block_m = 16 if num_assignments <= 64 else 64
    block_k = 32 if dtype == torch.float32 else 64
    return block_m, 64, block_k, 4


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if NAN_FILL_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    weights: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor],
    a_row_divisor: int,
    gated: bool,
    tiles: tuple[int, int, int, int],
) -> None:
    sorted_ids, block_expert = layout
    block_m, block_n, block_k, num_warps = tiles
    n_out = c.shape[1]
    _grouped_gemm_kernel[(block_expert.numel(), triton.cdiv(n_out, block_n))](
        a,
        b,
        c,
        weights,
        sorted_ids,
        block_expert,
        c.shape[0],
        n_out,
        a.shape[1],
        a_row_divisor,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        GATED=gated,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        DOT_UPCAST=_INTERPRETED and a.dtype == torch.bfloat16,
        num_warps=num_warps,
    )


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Triton `fused_moe_reference`: the grouped GEMM over the sorted assignments, gate/up (with SiLU-and-multiply)
    then down (times the routing weight), into one row per assignment; the K rows of a token are then summed."""
    _check_shapes(x, w_gate_up, w_down, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    top_k = topk_ids.shape[1]
    num_assignments = num_tokens * top_k
    if num_assignments == 0:
        return torch.zeros_like(x)
    tiles = _tile_config(num_assignments, x.dtype)
    layout = expert_block_layout(topk_ids, num_experts, tiles[0])
    weights = topk_weights.reshape(-1).contiguous()
    intermediate = _new_output((num_assignments, two_inter // 2), x.dtype, x.device)
    _launch(x, w_gate_up, intermediate, weights, layout, top_k, gated=True, tiles=tiles)
    per_assignment = _new_output((num_assignments, hidden), x.dtype, x.device)
    _launch(intermediate, w_down, per_assignment, weights, layout, 1, gated=False, tiles=tiles)
    return per_assignment.view(num_tokens, top_k, hidden).sum(dim=1)
