"""Counter-based random numbers for sampling: a uniform is a pure hash (splitmix64) of (seed, output position,
token id), so a row's draw is reproducible and independent of the batch it runs in, and integer hashing gives the
same bits on every device. This is the torch side and the definition; the Triton sampler hashes in-kernel with the
device functions of `kernels/counter_rng_triton.py`, which must stay bit-identical with the functions here.
"""
from __future__ import annotations

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1


def signed64(value: int) -> int:
    """A Python int wrapped to int64 two's complement, the way torch int64 arithmetic wraps."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 constants, written as signed int64 so torch accepts them as scalars.
GAMMA = signed64(0x9E3779B97F4A7C15)  # steps token ids within a row's stream
GAMMA_POSITION = signed64(0xD1B54A32D192ED03)  # a second odd constant: separates positions of one seed
MIX1 = signed64(0xBF58476D1CE4E5B9)
MIX2 = signed64(0x94D049BB133111EB)


def logical_shift_right(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic, so clear the sign-extended bits)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplies wrap around, as uint64 ones would)."""
    x = (x ^ logical_shift_right(x, 30)) * MIX1
    x = (x ^ logical_shift_right(x, 27)) * MIX2
    return x ^ logical_shift_right(x, 31)


def counter_uniforms(seeds: Tensor, positions: Tensor, num_tokens: int) -> Tensor:
    """[B, num_tokens] float32 uniforms in (0, 1), a pure function of (seed, position, token id).

    Integer hashing is exact on every device, and the top 23 bits become (2h+1) / 2**24, which float32
    holds exactly, so CPU and CUDA see the same numbers.
    """
    token_ids = torch.arange(num_tokens, dtype=torch.int64, device=seeds.device)
    return uniforms_at(seeds, positions, token_ids[None, :])


def uniforms_at(seeds: Tensor, positions: Tensor, token_ids: Tensor) -> Tensor:
    """`counter_uniforms` at the given token ids only: [B] seeds and positions, [B or 1, N] ids -> [B, N]."""
    key = mix64(mix64(seeds) + (positions + 1) * GAMMA_POSITION)
    bits = mix64(key[:, None] + (token_ids + 1) * GAMMA)
    return (logical_shift_right(bits, 41) * 2 + 1).to(torch.float32) * (2.0**-24)


__all__ = [
    "GAMMA",
    "GAMMA_POSITION",
    "MASK64",
    "MIX1",
    "MIX2",
    "counter_uniforms",
    "logical_shift_right",
    "mix64",
    "signed64",
    "uniforms_at",
]
