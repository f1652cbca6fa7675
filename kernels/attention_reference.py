"""Paged attention of a mixed step (prefill chunks and decode tokens) in plain torch: the reference that the Triton
kernel (`attention_triton`) and the CPU path (`cpu_attention`) must match, plus the pieces the CPU path reuses for
what its native kernel leaves to torch (`KVPages`, `StepLayout`, `Scoring`, `attend_decodes_reference`,
`attend_chunks_reference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayinfer.kernels.kv_quant import check_scales, dequantize


# Decode rows batched per call in the reference path: enough to keep the fused attention busy, few enough that a
# group's contexts are of similar length.
_DECODE_GROUP = 16


@dataclass(frozen=True)
class KVPages:
    """A layer's pool: K and V [num_blocks, block_size, Hkv, D] and, for a quantised pool (fp8 / int8 codes,
    `kv_quant`), their scales [num_blocks, block_size, Hkv]."""

    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_scales(self.k, self.k_scales, "k_scales")
        check_scales(self.v, self.v_scales, "v_scales")

    def gather(self, block_tables: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids -> K and V [B, nb * block_size, Hkv, D] token-major, `length` rounded up to blocks;
        quantised codes come back dequantised to `dtype`.

        One index_select of token slots on the flattened pool: on CPU about 3x faster than indexing by blocks."""
        block_size, num_kv_heads, head_dim = self.k.shape[1:]
        blocks = block_tables[:, : -(-length // block_size)]
        offsets = torch.arange(block_size, device=blocks.device)
        slots = (blocks[:, :, None] * block_size + offsets).flatten()
        shape = (blocks.shape[0], blocks.shape[1] * block_size, num_kv_heads, head_dim)
        out = []
        for cache, scales in ((self.k, self.k_scales), (self.v, self.v_scales)):
            rows = cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
            if scales is not None:
                rows = dequantize(rows, scales.view(-1, num_kv_heads).index_select(0, slots), dtype)
            out.append(rows.view(shape))
        return out[0], out[1]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    soft_cap: float | None,
    alibi_bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], allowed [B, Lq, Lk] -> [B, Lq, Hq, D]; GQA without copying K/V.

    alibi_bias [B, Lq, Lk] holds k_pos - q_pos; each head scales it by its slope.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qg = q.view(batch, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(qg.float(), kg.float().transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, Lk]
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().view(1, num_kv_heads, group, 1, 1)
        scores = scores + slopes * alibi_bias[:, None, None].float()
    scores.masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vg.float())  # [B, Hkv, G, Lq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).to(q.dtype)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`_attend` without soft-capping or ALiBi, through torch's fused attention: on CPU several times faster for
    batched decodes (no broadcast copies of K/V per query head, one multi-threaded kernel). allowed=None means
    plain causal attention of a chunk over itself (q and k of the same length): the fused kernel then skips the
    masked half instead of computing and masking it."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = None if allowed is None else allowed[:, None]
    try:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa, so repeat K/V per query head
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, seq_lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, Lq], k_pos [Lk], seq_lens [B] -> [B, Lq, Lk] causal (and sliding-window) visibility."""
    k = k_pos[None, None, :]
    q = q_pos[:, :, None]
    allowed = (k <= q) & (k < seq_lens[:, None, None])
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def paged_attention_reference(
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
    """q [T, Hq, D] -> [T, Hq, D]. Decode rows are batched in one gather; each prefill chunk runs on its own.

    Layout: `k_cache`/`v_cache` are [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives
    in block `block_tables[seq, t // block_size]` at offset `t % block_size`. The queries of sequence i are rows
    `query_start_loc[i]:query_start_loc[i+1]` of `q`; they are its newest tokens, so query j sits at position
    `seq_lens[i] - query_len + j` and attends causally to every earlier token in the pool (and its own chunk,
    whose K/V the caller has already written).

    sliding_window: a query sees keys less than this many positions behind it. soft_cap: scores become
    cap * tanh(score / cap) (after scaling). alibi_slopes [Hq]: adds slope * (k_pos - q_pos).
    max_query_len / max_seq_len / num_splits are launch hints for the Triton kernel; results do not depend on them.
    k_scales / v_scales [num_blocks, block_size, Hkv]: the scales of a quantised (fp8 / int8) pool, whose keys and
    values are read as codes * scale, cast to q's dtype.
    """
    step = StepLayout.of(query_start_loc, seq_lens)
    scoring = Scoring(scale, sliding_window, soft_cap, alibi_slopes)
    pages = KVPages(k_cache, v_cache, k_scales, v_scales)
    out = torch.empty_like(q)
    attend_decodes_reference(out, q, pages, block_tables, query_start_loc, seq_lens, step, scoring)
    attend_chunks_reference(out, q, pages, block_tables, seq_lens, step, scoring)
    return out


@dataclass(frozen=True)
class StepLayout:
    """The step's row layout on the host: where each sequence's queries start, its context and chunk lengths."""

    starts: list[int]
    lengths: list[int]
    query_lens: list[int]

    @staticmethod
    def of(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> "StepLayout":
        starts = query_start_loc.tolist()
        lengths = seq_lens.tolist()
        return StepLayout(starts, lengths, [starts[i + 1] - starts[i] for i in range(len(lengths))])

    def decode_rows(self) -> list[int]:
        return [i for i, n in enumerate(self.query_lens) if n == 1]


@dataclass(frozen=True)
class Scoring:
    """How scores are formed and masked, beyond causality."""

    scale: float
    sliding_window: int | None = None
    soft_cap: float | None = None
    alibi_slopes: torch.Tensor | None = None

    def plain(self) -> bool:
        """Scaled dot products and nothing else: torch's fused attention covers it."""
        return self.soft_cap is None and self.alibi_slopes is None

    def attend(self, q_rows, k, v, q_pos, lens):
        """q_rows [B, Lq, Hq, D] at positions q_pos [B, Lq] over k/v [B, Lk, Hkv, D] of lengths lens [B]."""
        k_pos = torch.arange(k.shape[1], device=q_rows.device)
        allowed = _allowed(q_pos, k_pos, lens, self.sliding_window)
        if self.plain():
            return _attend_sdpa(q_rows, k, v, allowed, self.scale)
        bias = (k_pos[None, None, :] - q_pos[:, :, None]) if self.alibi_slopes is not None else None
        return _attend(q_rows, k, v, allowed, self.scale, self.soft_cap, bias, self.alibi_slopes)


def attend_decodes_reference(out, q, pages: KVPages, block_tables, query_start_loc, seq_lens, step, scoring) -> None:
    """The step's decode rows, batched and padded to the longest context of their group: sorted by length in
    groups of _DECODE_GROUP, so short contexts are not padded to the longest of the whole step."""
    decode_rows = sorted(step.decode_rows(), key=step.lengths.__getitem__)
    for first in range(0, len(decode_rows), _DECODE_GROUP):
        group = decode_rows[first : first + _DECODE_GROUP]
        rows = torch.tensor(group, device=q.device)
        token_idx = query_start_loc[rows]
        lens = seq_lens[rows]
        k, v = pages.gather(block_tables[rows], step.lengths[group[-1]], q.dtype)
        out[token_idx] = scoring.attend(q[token_idx].unsqueeze(1), k, v, (lens - 1)[:, None], lens).squeeze(1)


def attend_chunks_reference(out, q, pages: KVPages, block_tables, seq_lens, step, scoring) -> None:
    """The step's prefill chunks (query_len > 1), one at a time."""
    for i, q_len in enumerate(step.query_lens):
        if q_len <= 1:
            continue
        start, length = step.starts[i], step.lengths[i]
        k, v = pages.gather(block_tables[i : i + 1], length, q.dtype)
        q_pos = torch.arange(length - q_len, length, device=q.device)[None]
        rows = q[start : start + q_len].unsqueeze(0)
        if q_len == length and scoring.plain() and scoring.sliding_window is None:  # a whole prompt: plain causal
            out[start : start + q_len] = _attend_sdpa(rows, k[:, :length], v[:, :length], None, scoring.scale)[0]
        else:
            out[start : start + q_len] = scoring.attend(rows, k, v, q_pos, seq_lens[i : i + 1])[0]


__all__ = [
    "KVPages",
    "Scoring",
    "StepLayout",
    "attend_chunks_reference",
    "attend_decodes_reference",
    "paged_attention_reference",
]
