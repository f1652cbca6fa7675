"""Rotary position embedding applied to q and k from precomputed cos/sin rows."""
from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotation of the first `rot_dim` features of each head.

    q: [T, Hq, D], k: [T, Hk, D], cos/sin: [T, rot_dim] (float32, already duplicated across halves).
    """
    rot_dim = cos.shape[-1]
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        x32 = x_rot.float()
        rotated = (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
        return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)

    return rotate(q), rotate(k)
