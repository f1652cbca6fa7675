"""The paged attention reference, and the CPU path (native decode kernel), against plain dense causal attention
on the same sequences."""
from __future__ import annotations

import math
import random

import pytest
import torch

from rayinfer.kernels.attention_reference import paged_attention_reference
from rayinfer.kernels.cpu_attention import paged_attention_cpu
from rayinfer.kernels.kv_cache_write import write_kv_reference

IMPLEMENTATIONS = {"reference": paged_attention_reference, "cpu": paged_attention_cpu}


def _dense_attention(q, k, v, q_positions, window):
    """q [Lq, Hq, D] at absolute positions q_positions; k/v [Lk, Hkv, D] at positions 0..Lk-1."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(q.shape[-1])
    k_pos = torch.arange(k.shape[0])
    allowed = k_pos[None, :] <= q_positions[:, None]
    if window is not None:
        allowed &= (q_positions[:, None] - k_pos[None, :]) < window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_mixed_step_matches_dense(
    num_heads: int, num_kv_heads: int, block_size: int, window: int | None, implementation: str
) -> None:
    rng = random.Random(num_heads * 100 + block_size + (window or 0))
    torch.manual_seed(rng.randrange(1 << 30))
    head_dim, num_blocks = 16, 64
    # (context already in the pool, new tokens this step): decodes, whole prompts, later chunks, block edges.
    shapes = [(0, 1), (7, 1), (block_size - 1, 1), (0, 9), (5, 3), (block_size, block_size), (3 * block_size - 2, 2)]
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    free_blocks = list(range(num_blocks))
    rng.shuffle(free_blocks)
    tables, qs, news, full_ks, full_vs, slots, starts, lens = [], [], [], [], [], [], [0], []
    for context, new in shapes:
        total = context + new
        table = [free_blocks.pop() for _ in range(-(-total // block_size))]
        full_k = torch.randn(total, num_kv_heads, head_dim)
        full_v = torch.randn(total, num_kv_heads, head_dim)
        for pos in range(context):  # earlier steps already wrote the context
            k_cache[table[pos // block_size], pos % block_size] = full_k[pos]
            v_cache[table[pos // block_size], pos % block_size] = full_v[pos]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(context, total)]
        qs.append(torch.randn(new, num_heads, head_dim))
        tables.append(table)
        full_ks.append(full_k)
        full_vs.append(full_v)
        starts.append(starts[-1] + new)
        lens.append(total)
    # Blocks past a sequence's end must never be read as data: zero them (as the pool is), keep NaN elsewhere.
    for table, total in zip(tables, lens):
        tail = table[-1]
        k_cache[tail, (total - 1) % block_size + 1 :] = 0
        v_cache[tail, (total - 1) % block_size + 1 :] = 0
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    q = torch.cat(qs)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_ks, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_vs, shapes)])
    # Interleave a padding slot to check that -1 is skipped.
    write_kv_reference(
        torch.cat([new_k, torch.randn(1, num_kv_heads, head_dim)]),
        torch.cat([new_v, torch.randn(1, num_kv_heads, head_dim)]),
        k_cache,
        v_cache,
        torch.tensor(slots + [-1]),
    )
    out = IMPLEMENTATIONS[implementation](
        q, k_cache, v_cache, block_tables, torch.tensor(starts), torch.tensor(lens), head_dim**-0.5, window
    )
    for i, (context, new) in enumerate(shapes):
        expected = _dense_attention(qs[i], full_ks[i], full_vs[i], torch.arange(context, context + new), window)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected, rtol=1e-5, atol=1e-5)


def test_write_kv_skips_padding_slots() -> None:
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    key = torch.arange(9.0).view(3, 1, 3)
    write_kv_reference(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat = k_cache.view(-1, 1, 3)
    assert torch.equal(flat[5], key[0]) and torch.equal(flat[0], key[2])
    assert flat[[1, 2, 3, 4, 6, 7]].abs().sum() == 0
    assert torch.equal(v_cache.view(-1, 1, 3)[5], -key[0])
