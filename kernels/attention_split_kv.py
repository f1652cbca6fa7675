"""Split-KV (flash-decoding) for the Triton paged attention: when a step's key range is worth cutting into parts
that run as separate programs, and the kernel that merges the parts' partial softmax results. Kept apart from
`attention_triton` because both only matter for long contexts with few sequences, where one program per query tile
would leave most of the GPU idle.
"""
from __future__ import annotations

import torch

from rayinfer.kernels.triton_compat import tl, triton


# When to split: it pays off when the unsplit grid leaves most SMs idle, i.e. few sequences x KV heads (long
# single-stream decodes) and long contexts. We split when the working programs (query tiles that have rows x
# Hkv) are at most half the SM count and max_seq_len >= _SPLIT_MIN_SEQ_LEN, aiming at about two programs per SM
# but keeping at least _SPLIT_MIN_KEYS keys per split (so the partial write + reduce stays cheap) and at most
# _MAX_SPLITS parts. Example, H100 (132 SMs), one 32k-token decode, 8 KV heads: 8 programs -> 33 splits of ~1k keys.
_SPLIT_MIN_SEQ_LEN = 1024
_SPLIT_MIN_KEYS = 512
_MAX_SPLITS = 64
_DEFAULT_SM_COUNT = 132  # used off CUDA (the interpreter), where the heuristic only matters for coverage

_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def choose_num_splits(busy_programs: int, max_seq_len: int, device: torch.device) -> int:
    """How many parts to cut each query tile's key range into (1: no split), as the note above the constants says."""
    sm_count = _sm_count(device)
    if max_seq_len < _SPLIT_MIN_SEQ_LEN or 2 * busy_programs > sm_count:
        return 1
    return max(1, min(2 * sm_count // busy_programs, max_seq_len // _SPLIT_MIN_KEYS, _MAX_SPLITS))


@triton.jit
def _reduce_splits_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    query_end_ptr,
    num_tokens,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if token >= tl.load(query_end_ptr):  # a padding row that belongs to no sequence: left as it is
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    s_valid = offs_s < num_splits
    part = (offs_s * num_tokens + token) * num_heads + head
    m = tl.load(part_m_ptr + part, mask=s_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    denom = tl.sum(weight * l, 0)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_valid[:, None] & d_mask[None, :], other=0.0
    )
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    out_ptrs = out_ptr + token * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def reduce_splits(
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    part_acc: torch.Tensor,
    out: torch.Tensor,
    query_end: torch.Tensor,
) -> None:
    """Merges the parts into out [T, Hq, D]: part_m / part_l [S, T, Hq] are each part's running max (log2 domain)
    and sum, part_acc [S, T, Hq, D] its unnormalised accumulator, all float32. query_end[0]: the row count of the
    step's sequences (the last entry of query_start_loc); rows past it are padding and stay as they are."""
    num_splits, num_tokens, num_heads, head_dim = part_acc.shape
    _reduce_splits_kernel[(num_tokens, num_heads)](
        part_m,
        part_l,
        part_acc,
        out,
        query_end,
        num_tokens,
        num_heads,
        num_splits,
        *out.stride(),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
    )


__all__ = ["choose_num_splits", "reduce_splits"]
