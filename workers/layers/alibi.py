"""ALiBi slopes, computed as transformers' `build_alibi_tensor` computes them (Bloom).

For n heads with p the largest power of two <= n, the first p slopes are b**1..b**p with b = 2**(-8/p); when n is
not a power of two, the remaining n - p heads take the odd powers b'**1, b'**3, ... of b' = 2**(-8/(2p)).
"""
from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[num_heads] float32 slopes of every head, in head order."""
    if num_heads < 1:
        raise ValueError(f"num_attention_heads must be positive for ALiBi (got {num_heads})")
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest_power_of_2, dtype=torch.int32))
    if closest_power_of_2 != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), dtype=torch.float32)
        remaining = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def rank_alibi_slopes(num_heads: int, rank: int, tp_size: int) -> torch.Tensor:
    """The slopes of the heads one tensor-parallel rank holds (a contiguous block of num_heads / tp_size heads)."""
    per_rank = num_heads // tp_size
    return alibi_slopes(num_heads)[rank * per_rank : (rank + 1) * per_rank]
