"""Attention over the paged KV pool for one flattened step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayinfer import kernels


@dataclass
class AttentionMetadata:
    """Where each token of a flattened step sits: built once per step by the model runner, read by every layer."""

    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat pool slot that receives its K/V (-1: padding)
    query_start_loc: torch.Tensor  # [B + 1] where each sequence's tokens start in the batch
    seq_lens: torch.Tensor  # [B] context length of each sequence once this step's tokens are in
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    max_query_len: int  # longest chunk in the step (host int: sizes kernel launches without a device sync)
    max_seq_len: int  # longest context in the step
    rope_lengths: torch.Tensor | None = None  # [T] only for dynamic-NTK rope


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's pool, then attends over it. `kv_cache` (and, for an fp8 / int8
    pool, `kv_scales`) are bound by the runner.

    `k_scale` / `v_scale`: static scales for a quantised pool, float32 tensors of one element (the layer) or one
    per KV head of this rank, on the model's device; a checkpoint that ships them sets them at load time (before
    CUDA graphs are captured, which read them in place). None (the default): each row's scale is computed as it is
    written. A pool in the model's dtype ignores them."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        scale: float | None = None,
        soft_cap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap  # scores become soft_cap * tanh(score / soft_cap) after scaling
        # ALiBi (Bloom): [num_heads] slopes of this rank's heads; scores get slope * (k_pos - q_pos) after scaling.
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        # Buffers, so that moving the model moves them; left out of state_dict, as most checkpoints have none.
        self.register_buffer("k_scale", None, persistent=False)
        self.register_buffer("v_scale", None, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("PagedAttention used before the model runner bound its KV cache")
        k_cache, v_cache = self.kv_cache
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_scales, v_scales = self.kv_scales or (None, None)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales, self.k_scale, self.v_scale)
        out = kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            self.scale,
            self.sliding_window,
            self.soft_cap,
            alibi_slopes=self.alibi_slopes,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            k_scales=k_scales,
            v_scales=v_scales,
        )
        return out.reshape(-1, self.num_heads * self.head_dim)
