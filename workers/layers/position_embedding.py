"""Learned absolute position embeddings (GPT-2's wpe, OPT's embed_positions), replicated on every rank.

The table is small next to the token embedding (max positions x hidden), so each rank keeps it whole and no
communication is needed. `offset` shifts the row a position reads: OPT's table starts 2 rows in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionEmbedding(nn.Module):
    def __init__(self, num_rows: int, hidden_size: int, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(num_rows, hidden_size), requires_grad=False)

    @property
    def max_positions(self) -> int:
        return self.weight.shape[0] - self.offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)
