"""Token embedding and LM head split by vocabulary range across tensor-parallel ranks."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.parallel_state import tp_group

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = tp_group()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.load_rows

    def load_rows(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        # The last rank may hold fewer real rows; its padding rows stay zero and are never selected.
        rows = max(0, min(self.rows_per_rank, loaded.shape[0] - self.vocab_start))
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (gathered from every rank)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
