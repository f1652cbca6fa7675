"""Paged attention for CPU tensors: decode rows through the native kernel (kernels/paged_decode_cpu.c), prefill
chunks through the torch reference.

Decodes are where the torch path loses on a CPU: for every layer and step it copies each sequence's whole
context out of the pool (padded to its group's longest) and reads the copy again. The native kernel reads each
K/V row once, straight from the pool (float32, or fp8 / int8 codes with their scales). Prefill chunks stay on
torch's fused attention, which is efficient there (many queries per key). Whatever the native kernel does not
cover (other dtypes, soft-capping, ALiBi, a library that could not be built) runs the reference unchanged.
"""
from __future__ import annotations

import ctypes

import torch

from rayinfer.kernels.attention_reference import (
    KVPages,
    Scoring,
    StepLayout,
    attend_chunks_reference,
    attend_decodes_reference,
    paged_attention_reference,
)
from rayinfer.kernels.kv_quant import FP8_DTYPE
from rayinfer.kernels.native_build import load_native_library

_SOURCE = "paged_decode_cpu.c"
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
# The native kernel's code kinds (paged_decode_attention_q8's code_kind).
_CODE_KINDS = {FP8_DTYPE: 0, torch.int8: 1}
_TAIL_ARGS = [_ptr, _ptr, _i64, _ptr] + [_i64] * 5 + [ctypes.c_float, _i64, ctypes.c_int, _ptr]


def _kernels():
    """(float32 pool kernel, quantised pool kernel) of the native library, or None."""
    library = load_native_library(_SOURCE)
    if library is None:
        return None
    float_kernel, quant_kernel = library.paged_decode_attention_f32, library.paged_decode_attention_q8
    if float_kernel.argtypes is None:
        float_kernel.restype = quant_kernel.restype = ctypes.c_int
        float_kernel.argtypes = [_ptr, _i64, _ptr, _ptr] + _TAIL_ARGS
        quant_kernel.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, ctypes.c_int] + _TAIL_ARGS
    return float_kernel, quant_kernel


def native_decode_available() -> bool:
    return _kernels() is not None


def _native_covers(q: torch.Tensor, pages: KVPages, scoring: Scoring) -> bool:
    pools = (pages.k, pages.v) + ((pages.k_scales, pages.v_scales) if pages.k_scales is not None else ())
    return (
        q.dtype == torch.float32
        and pages.v.dtype == pages.k.dtype
        and (pages.k.dtype == torch.float32 or pages.k.dtype in _CODE_KINDS)
        and pages.v.shape == pages.k.shape
        and all(t.is_contiguous() for t in pools)
        and q.device.type == "cpu"
        and scoring.soft_cap is None
        and scoring.alibi_slopes is None
        and q.stride(2) == 1
        and q.stride(1) == q.shape[2]
    )


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def attend_decodes_native(out, q, pages: KVPages, block_tables, rows, seq_lens, scoring: Scoring) -> bool:
    """Attends decode rows `rows` (one per sequence of `block_tables` / `seq_lens`) into `out` (contiguous, like
    the pools); False when the native kernel is unavailable or failed, leaving the rows to the caller."""
    kernels = _kernels()
    if kernels is None:
        return False
    float_kernel, quant_kernel = kernels
    rows, block_tables, seq_lens = _int64(rows), _int64(block_tables), _int64(seq_lens)
    num_kv_heads, head_dim = pages.k.shape[2], pages.k.shape[3]
    # The kernel reads q rows with their own stride (q is often a view into the fused QKV output).
    if pages.k_scales is None:
        pool = [pages.k.data_ptr(), pages.v.data_ptr()]
        kernel = float_kernel
    else:
        pool = [pages.k.data_ptr(), pages.v.data_ptr(), pages.k_scales.data_ptr(), pages.v_scales.data_ptr(),
                _CODE_KINDS[pages.k.dtype]]
        kernel = quant_kernel
    status = kernel(
        q.data_ptr(),
        q.stride(0),
        *pool,
        rows.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        rows.numel(),
        q.shape[1],
        num_kv_heads,
        head_dim,
        pages.k.shape[1],
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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract and results as `paged_attention_reference`."""
    scoring = Scoring(scale, sliding_window, soft_cap, alibi_slopes)
    pages = KVPages(k_cache, v_cache, k_scales, v_scales)
    if not _native_covers(q, pages, scoring):
        return paged_attention_reference(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window, soft_cap, alibi_slopes,
            k_scales=k_scales, v_scales=v_scales,
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
        if not attend_decodes_native(out, q, pages, tables, rows, lens, scoring):
            attend_decodes_reference(out, q, pages, block_tables, query_start_loc, seq_lens, step, scoring)
    attend_chunks_reference(out, q, pages, block_tables, seq_lens, step, scoring)
    return out
