"""ALiBi: paged attention with a per-head linear bias on the distance to each key instead of rotary positions."""
from __future__ import annotations

import math

import torch

from rayinfer import kernels
from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes (as transformers builds them): a geometric series 2^(-8/n), 2^(-16/n), ... over the
    largest power of two n <= num_heads, then every other slope of the series for 2n, for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**power for power in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base**power for power in range(1, 1 + 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class AlibiPagedAttention(PagedAttention):
    """`slopes` [local heads]: added to the scaled scores as slope * (k_pos - q_pos) (the kernels' convention)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, slopes: torch.Tensor) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, None)
        if slopes.shape != (num_heads,):
            raise ValueError(f"ALiBi needs one slope per local head ({num_heads}), got shape {tuple(slopes.shape)}")
        self.register_buffer("alibi_slopes", slopes.float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("PagedAttention used before the model runner bound its KV cache")
        k_cache, v_cache = self.kv_cache
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            self.scale,
            None,
            None,
            self.alibi_slopes,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )
        return out.reshape(-1, self.num_heads * self.head_dim)
