"""Attention of a mixed step (prefill chunks and decode tokens) over the paged KV pool.

Layout: `k_cache`/`v_cache` are [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives
in block `block_tables[seq, t // block_size]` at offset `t % block_size`. The queries of sequence i are rows
`query_start_loc[i]:query_start_loc[i+1]` of `q`; they are its newest tokens, so query j sits at position
`seq_lens[i] - query_len + j` and attends causally to every earlier token in the pool (and its own chunk,
whose K/V the caller has already written).
"""
from __future__ import annotations

import torch


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


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """[B, nb] block ids -> [B, nb * block_size, Hkv, D] token-major context, `length` rounded up to blocks."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    gathered = cache[block_tables[:, :num_blocks]]
    return gathered.flatten(1, 2)


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
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]. Decode rows are batched in one gather; each prefill chunk runs on its own.

    sliding_window: a query sees keys less than this many positions behind it. soft_cap: scores become
    cap * tanh(score / cap) (after scaling). alibi_slopes [Hq]: adds slope * (k_pos - q_pos).
    max_query_len / max_seq_len / num_splits are launch hints for the Triton kernel; results do not depend on them.
    """
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    query_lens = [starts[i + 1] - starts[i] for i in range(len(lengths))]
    out = torch.empty_like(q)
    device = q.device

    def attend(q_rows, k, v, q_pos, lens):
        k_pos = torch.arange(k.shape[1], device=device)
        allowed = _allowed(q_pos, k_pos, lens, sliding_window)
        bias = (k_pos[None, None, :] - q_pos[:, :, None]) if alibi_slopes is not None else None
        return _attend(q_rows, k, v, allowed, scale, soft_cap, bias, alibi_slopes)

    decode_rows = [i for i, n in enumerate(query_lens) if n == 1]
    if decode_rows:
        rows = torch.tensor(decode_rows, device=device)
        token_idx = query_start_loc[rows]
        lens = seq_lens[rows]
        longest = max(lengths[i] for i in decode_rows)
        k = _gather_context(k_cache, block_tables[rows], longest)
        v = _gather_context(v_cache, block_tables[rows], longest)
        out[token_idx] = attend(q[token_idx].unsqueeze(1), k, v, (lens - 1)[:, None], lens).squeeze(1)

    for i, q_len in enumerate(query_lens):
        if q_len <= 1:
            continue
        start, length = starts[i], lengths[i]
        k = _gather_context(k_cache, block_tables[i : i + 1], length)
        v = _gather_context(v_cache, block_tables[i : i + 1], length)
        q_pos = torch.arange(length - q_len, length, device=device)[None]
        out[start : start + q_len] = attend(q[start : start + q_len].unsqueeze(0), k, v, q_pos, seq_lens[i : i + 1])[0]
    return out
