"""Top-k expert routing and the experts' SwiGLU MLPs as stacked, tensor-parallel parameters.

Tensor parallelism: every rank holds every expert, with that expert's intermediate dimension split across ranks
(gate/up rows like a column-parallel linear, down columns like a row-parallel one), so each rank computes a partial
sum of every token's output and one all-reduce completes it. The router is small and replicated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer import kernels
from rayinfer.workers.parallel_state import tp_group

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor

GATE, UP = 0, 1  # the halves of an expert's gate_up weight, as named in shard ids


def route_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, expert ids [T, K]): softmax over the experts in float32, the top k of them, and,
    when `renormalize`, those k weights divided by their sum (as transformers' Mixtral and Qwen2-MoE routers do)."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def replicated_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear every rank holds whole (routers and Qwen2-MoE's shared-expert gate: a few rows each)."""
    return nn.Linear(in_features, out_features, bias=False).requires_grad_(False)


class _StackedWeight(nn.Module):
    """Holds one `weight` parameter [num_experts, ...], so checkpoint names end in `.weight` like a linear's."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape), requires_grad=False)


class FusedMoE(nn.Module):
    """The routed experts of one layer. Checkpoint tensors it loads:

    - one expert's projection ([I, H] gate or up, [H, I] down) with shard id (expert, GATE | UP) or (expert, None)
      for down: the per-expert layout of hub checkpoints;
    - all experts at once with shard id None: transformers 5's fused layout, gate_up [E, 2I, H] (gate rows first)
      and down [E, H, I].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.tp = tp_group()
        if intermediate_size % self.tp.size:
            raise ValueError(
                f"expert intermediate size ({intermediate_size}) is not divisible by tensor_parallel_size "
                f"({self.tp.size})"
            )
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.inter_per_rank = intermediate_size // self.tp.size
        self.gate_up_proj = _StackedWeight(num_experts, 2 * self.inter_per_rank, hidden_size)
        self.gate_up_proj.weight.weight_loader = self.load_gate_up
        self.down_proj = _StackedWeight(num_experts, hidden_size, self.inter_per_rank)
        self.down_proj.weight.weight_loader = self.load_down

    def _check_expert(self, loaded: CheckpointTensor, dims: int) -> None:
        if len(loaded.shape) != dims:
            raise ValueError(f"checkpoint tensor {loaded.name} of shape {loaded.shape} is not an expert weight")

    def load_gate_up(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object) -> None:
        rows, first = self.inter_per_rank, self.tp.rank * self.inter_per_rank
        if shard_id is None:  # fused [E, 2I, H]: this rank's rows of the gate half, then of the up half
            self._check_expert(loaded, 3)
            for half in (GATE, UP):
                part = loaded.narrow(1, half * self.intermediate_size + first, rows)
                param.data.narrow(1, half * rows, rows).copy_(part)
            return
        expert, half = shard_id
        self._check_expert(loaded, 2)
        param.data[expert].narrow(0, half * rows, rows).copy_(loaded.narrow(0, first, rows))

    def load_down(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: object) -> None:
        cols, first = self.inter_per_rank, self.tp.rank * self.inter_per_rank
        if shard_id is None:  # fused [E, H, I]
            self._check_expert(loaded, 3)
            param.data.copy_(loaded.narrow(2, first, cols))
            return
        expert, _ = shard_id
        self._check_expert(loaded, 2)
        param.data[expert].copy_(loaded.narrow(1, first, cols))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = kernels.fused_moe(x, self.gate_up_proj.weight, self.down_proj.weight, topk_weights, topk_ids)
        return self.tp.all_reduce(out)


def expert_packed_modules(num_experts: int, names: dict[str, str]) -> dict[str, tuple[str, tuple[int, int | None]]]:
    """`packed_modules` entries for per-expert checkpoint names: `experts.{e}.{name}` -> our stacked
    `experts.gate_up_proj` / `experts.down_proj`, shard (e, GATE | UP | None). `names` maps the checkpoint's
    projection names to "gate", "up" or "down" (Mixtral: w1, w3, w2)."""
    halves = {"gate": ("gate_up_proj", GATE), "up": ("gate_up_proj", UP), "down": ("down_proj", None)}
    entries = {}
    for expert in range(num_experts):
        for source, role in names.items():
            target, half = halves[role]
            entries[f"experts.{expert}.{source}"] = (f"experts.{target}", (expert, half))
    return entries
