"""LM head with a bias (GPT-J, Phi): the bias is split by vocabulary range like the weight rows."""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.layers.embedding import ParallelLMHead


class BiasedLMHead(ParallelLMHead):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.bias = nn.Parameter(torch.zeros(self.rows_per_rank), requires_grad=False)
        self.bias.weight_loader = self.load_rows  # same vocabulary range as the weight rows; padding stays 0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight, self.bias))
        return logits[..., : self.vocab_size]
