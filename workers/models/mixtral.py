"""Mixtral: the Mistral decoder (sliding window from config.json, null for none) with every MLP replaced by a top-k
mixture of num_local_experts SwiGLU experts of intermediate_size; no shared expert.

Routing: softmax over the experts in float32, the top num_experts_per_tok, always renormalised to sum to 1 (the
weights stay float32, as in transformers). Hub checkpoints name the block `block_sparse_moe` and an expert's
projections w1 (gate), w3 (up), w2 (down); transformers 5 calls the block `mlp`.

Tensor parallelism: as Llama for attention; each expert's intermediate dimension splits across ranks (see
`FusedMoE`), the router is replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.moe import FusedMoE, expert_packed_modules, replicated_linear, route_top_k
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def _num_experts(spec: ModelSpec) -> int:
    value = spec.raw.get("num_local_experts")
    if value is None or int(value) < 1:
        raise ValueError(f"{spec.architecture}: num_local_experts must be >= 1 (got {value!r})")
    return int(value)


class MixtralSparseBlock(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.hidden_act != "silu":
            raise ValueError(f"hidden_act {spec.hidden_act!r} is not supported for {spec.architecture}; expected silu")
        num_experts = _num_experts(spec)
        self.top_k = int(spec.raw.get("num_experts_per_tok", 2))
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be between 1 and num_local_experts ({num_experts})"
            )
        self.gate = replicated_linear(spec.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, spec.hidden_size, spec.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_top_k(self.gate(x), self.top_k, renormalize=True)
        return self.experts(x, weights, ids)


class MixtralDecoderLayer(LlamaDecoderLayer):
    mlp_cls = MixtralSparseBlock


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel
    checkpoint_renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        # transformers 5 can also hold all experts of a layer in two tensors without a `.weight` suffix.
        (r"(\.mlp\.experts\.(?:gate_up_proj|down_proj))$", r"\1.weight"),
    )

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__(spec, max_len)
        self.packed_modules = {
            **expert_packed_modules(_num_experts(spec), {"w1": "gate", "w3": "up", "w2": "down"}),
            **LlamaForCausalLM.packed_modules,
        }
