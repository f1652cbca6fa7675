"""Paged attention for CPU tensors: decode rows through the native kernel (kernels/paged_decode_cpu.c), prefill
chunks through the torch reference.

Decodes are where the torch path loses on a CPU: for every layer and step it copies each sequence's whole
context out of the pool (padded to its group's longest) and reads the copy again. The native kernel reads each
K/V row once, straight from the pool. Prefill chunks stay on torch's fused attention, which is efficient there
(many queries per key). Whatever the native kernel does not cover (other dtypes, soft-capping, ALiBi, a library
that could not be built) runs the reference unchanged.
"""
from __future__ import annotations

import ctypes

import torch

from rayinfer.kernels.attention_reference import (
    Scoring,
    StepLayout,
    attend_chunks_reference,
    attend_decodes_reference,
    paged_attention_reference,
)
from rayinfer.kernels.native_build import load_native_library

_SOURCE = "paged_decode_cpu.c"
_i64, _f32p = ctypes.c_int64, ctypes.c_void_p


def _decode_kernel():
    library = load_native_library(_SOURCE)
    if library is None:
        return None
    kernel = library.paged_decode_attention_f32
    if kernel.argtypes is None:
        kernel.restype = ctypes.c_int
        kernel.argtypes = [_f32p, _i64, _f32p, _f32p, _f32p, _f32p, _i64, _f32p] + [_i64] * 5 + [
            ctypes.c_float, _i64, ctypes.c_int, _f32p
        ]
    return kernel


def native_decode_available() -> bool:
    return _decode_kernel() is not None


def _native_covers(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scoring: Scoring) -> bool:
    return (
        q.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and v_cache.dtype == torch.float32
        and v_cache.shape == k_cache.shape
        and q.device.type == "cpu"
        and scoring.soft_cap is None
        and scoring.alibi_slopes is None
        and q.stride(2) == 1
        and q.stride(1) == q.shape[2]
    )


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def attend_decodes_native(out, q, k_cache, v_cache, block_tables, rows, seq_lens, scoring: Scoring) -> bool:
    """Attends decode rows `rows` (one per sequence of `block_tables` / `seq_lens`) into `out` (contiguous, like
    the pools); False when the native kernel is unavailable or failed, leaving the rows to the caller."""
    kernel = _decode_kernel()
    if kernel is None:
        return False
    rows, block_tables, seq_lens = _int64(rows), _int64(block_tables), _int64(seq_lens)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    # The kernel reads q rows with their own stride (q is often a view into the fused QKV output).
    q_row_stride = q.stride(0)
    status = kernel(
        q.data_ptr(),
        q_row_stride,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        rows.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        rows.numel(),
        q.shape[1],
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        scoring.scale,
        scoring.sliding_window or 0,
        torch.get_num_threads(),
        out.data_ptr(),
    )
    return status == 0


def paged_attention_cpu(
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
) -> torch.Tensor:
    """Same contract and results as `paged_attention_reference`."""
    scoring = Scoring(scale, sliding_window, soft_cap, alibi_slopes)
    if not (_native_covers(q, k_cache, v_cache, scoring) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return paged_attention_reference(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window, soft_cap, alibi_slopes
        )
    step = StepLayout.of(query_start_loc, seq_lens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    decode_rows = step.decode_rows()
    if decode_rows:
        if len(decode_rows) == len(step.lengths):  # a pure decode step: no selection needed
            rows, tables, lens = query_start_loc[:-1], block_tables, seq_lens
        else:
            picked = torch.tensor(decode_rows, device=q.device)
            rows, tables, lens = query_start_loc[picked], block_tables[picked], seq_lens[picked]
        if not attend_decodes_native(out, q, k_cache, v_cache, tables, rows, lens, scoring):
            attend_decodes_reference(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, step, scoring)
    attend_chunks_reference(out, q, k_cache, v_cache, block_tables, seq_lens, step, scoring)
    return out
