"""The counter-based RNG of `kernels/counter_rng.py` as Triton device functions, so the sampling kernel hashes its
uniforms in-kernel instead of reading a [B, V] tensor of them. Every function here must stay bit-identical with its
torch twin there (the constants are spelled out because jit code cannot read that module's globals);
`counter_uniforms_triton` exists so tests can compare the two bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rayinfer.kernels.triton_compat import HAS_TRITON, tl, triton


@triton.jit
def mix64_u64(x):
    """splitmix64's finaliser on uint64 (multiplies wrap mod 2**64, shifts are logical): `counter_rng.mix64`."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def row_key(seed, position):
    """The uint64 stream key of one row, from its int64 seed and output position (GAMMA_POSITION steps positions)."""
    seed_mix = mix64_u64(seed.to(tl.uint64, bitcast=True))
    return mix64_u64(seed_mix + (position + 1).to(tl.uint64, bitcast=True) * 0xD1B54A32D192ED03)


@triton.jit
def token_uniforms(stream, token_ids):
    """float32 uniforms (2h+1) / 2**24 for int32 token ids of the row keyed `stream`: `counter_rng.uniforms_at`."""
    bits = mix64_u64(stream + (token_ids.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
    return ((bits >> 41) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _uniforms_kernel(seeds_ptr, positions_ptr, out_ptr, num_tokens, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    stream = row_key(tl.load(seeds_ptr + row), tl.load(positions_ptr + row))
    offs = tl.arange(0, BLOCK)
    for start in range(0, num_tokens, BLOCK):
        idx = start + offs
        tl.store(out_ptr + row * num_tokens + idx, token_uniforms(stream, idx), mask=idx < num_tokens)


def counter_uniforms_triton(seeds: Tensor, positions: Tensor, num_tokens: int) -> Tensor:
    """`counter_rng.counter_uniforms` computed by the hash the sampling kernel runs."""
    if not HAS_TRITON:
        raise RuntimeError("counter_uniforms_triton needs Triton, which is not installed on this platform")
    out = torch.empty(seeds.shape[0], num_tokens, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0] and num_tokens:
        block = min(1024, triton.next_power_of_2(num_tokens))
        _uniforms_kernel[(seeds.shape[0],)](
            seeds.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous(), out, num_tokens, BLOCK=block
        )
    return out


__all__ = ["counter_uniforms_triton", "mix64_u64", "row_key", "token_uniforms"]
