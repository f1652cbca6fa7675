"""Rotary position embedding applied in place to q and k, from cos/sin tables indexed by position."""
from __future__ import annotations

import torch


def rotary_embedding_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first `rot_dim = 2 * cos_cache.shape[1]` features of every head of q [T, Hq, D] and k [T, Hk, D].

    cos_cache/sin_cache: [N, rot_dim / 2] float32, row `positions[t]` for token t. Neox style pairs feature i with
    i + rot_dim/2; GPT-J style pairs 2i with 2i + 1. Math in float32, written back in the input dtype.
    """
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    half = cos_cache.shape[1]
    for x in (q, k):
        rot = x[..., : 2 * half].float()
        if is_neox:
            first, second = rot[..., :half], rot[..., half:]
        else:
            first, second = rot[..., 0::2], rot[..., 1::2]
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        if is_neox:
            rotated = torch.cat((new_first, new_second), dim=-1)
        else:
            rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
        x[..., : 2 * half] = rotated.to(x.dtype)
    return q, k
