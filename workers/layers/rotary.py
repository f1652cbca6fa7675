"""Rotary embedding tables: default, linear, dynamic-NTK and llama3 frequency schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from rayinfer.workers.model_config import RopeSpec


def _inv_freq(theta: float | torch.Tensor, rot_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    if isinstance(theta, torch.Tensor):
        return 1.0 / (theta[:, None] ** exponents[None, :])
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(spec: RopeSpec) -> torch.Tensor:
    inv_freq = _inv_freq(spec.theta, spec.rot_dim)
    old_len = spec.original_max_position_embeddings or 8192
    low_wavelen = old_len / spec.low_freq_factor
    high_wavelen = old_len / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds half-width cos/sin tables for every position of the context; kernels pick rows by position.

    Dynamic NTK scaling, as transformers applies it to a sequence run alone, rotates a token with the
    frequencies for length max(prompt_len, position + 1) once that exceeds max_position_embeddings; a step
    with such tokens gets its own small table, one row per token.
    """

    def __init__(self, spec: RopeSpec, max_len: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "llama3":
            inv_freq = _llama3_inv_freq(spec)
        else:
            inv_freq = _inv_freq(spec.theta, spec.rot_dim)
        if spec.kind == "linear":
            inv_freq = inv_freq / spec.factor
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    @property
    def is_dynamic(self) -> bool:
        return self.spec.kind == "dynamic"

    def forward(
        self, positions: torch.Tensor, rope_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (cos table, sin table, row of each token in them)."""
        if not self.is_dynamic or rope_lengths is None:
            return self.cos_cache, self.sin_cache, positions
        limit = self.spec.max_position_embeddings
        stretched = rope_lengths > limit
        if not bool(stretched.any()):
            return self.cos_cache, self.sin_cache, positions
        spec = self.spec
        lengths = rope_lengths[stretched].float()
        base = spec.theta * ((spec.factor * lengths / limit) - (spec.factor - 1)) ** (spec.rot_dim / (spec.rot_dim - 2))
        freqs = positions[stretched].float()[:, None] * _inv_freq(base, spec.rot_dim).to(positions.device)
        cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        cos[stretched], sin[stretched] = freqs.cos(), freqs.sin()
        return cos, sin, torch.arange(positions.shape[0], device=positions.device)
