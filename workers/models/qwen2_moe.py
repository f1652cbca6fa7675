"""Qwen2-MoE: the Qwen2 decoder (qkv bias, no o_proj bias) whose MLP is, on the sparse layers, a top-k mixture of
experts plus an always-on shared expert gated per token by sigmoid(shared_expert_gate(x)).

A layer is sparse unless listed in mlp_only_layers, when num_experts > 0 and (index + 1) % decoder_sparse_step == 0;
the others keep a dense MLP of intermediate_size. Routed experts have moe_intermediate_size, the shared expert
shared_expert_intermediate_size. Routing: softmax over the experts in float32, top num_experts_per_tok,
renormalised only when norm_topk_prob, then cast to the activations' dtype (as transformers does).

Tensor parallelism: attention and the dense/shared MLPs split as in Llama, the experts' intermediate dimension
splits across ranks (see `FusedMoE`); the router and the shared-expert gate are replicated.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.moe import FusedMoE, expert_packed_modules, replicated_linear, route_top_k
from rayinfer.workers.layers.norm import RMSNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    RopeTables,
    norm_input,
)


def _required(spec: ModelSpec, key: str) -> int:
    value = spec.raw.get(key)
    if value is None:
        raise ValueError(f"{spec.architecture}: config.json lacks {key}")
    return int(value)


def is_sparse_layer(spec: ModelSpec, layer_index: int) -> bool:
    """transformers' rule for which layers get the mixture of experts."""
    if layer_index in (spec.raw.get("mlp_only_layers") or []) or int(spec.raw.get("num_experts") or 0) <= 0:
        return False
    step = int(spec.raw.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1 when num_experts > 0 (got {step})")
    return (layer_index + 1) % step == 0


class Qwen2MoeSparseBlock(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        num_experts = _required(spec, "num_experts")
        self.top_k = _required(spec, "num_experts_per_tok")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be between 1 and num_experts ({num_experts})")
        self.renormalize = bool(spec.raw.get("norm_topk_prob", False))
        self.gate = replicated_linear(spec.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, spec.hidden_size, _required(spec, "moe_intermediate_size"))
        shared_size = _required(spec, "shared_expert_intermediate_size")
        self.shared_expert = LlamaMLP(dataclasses.replace(spec, intermediate_size=shared_size))
        self.shared_expert_gate = replicated_linear(spec.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_top_k(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights.to(x.dtype), ids)
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen2MoeDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LlamaAttention(spec, layer_index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = Qwen2MoeSparseBlock(spec) if is_sparse_layer(spec, layer_index) else LlamaMLP(spec)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same contract as the Llama layer: the stream is x + residual; the last add is folded into model.norm.
        x, residual = norm_input(self.input_layernorm, x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope, meta), residual)
        return self.mlp(x), residual


class Qwen2MoeModel(LlamaModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2MoeModel
    # transformers 5 can also hold all experts of a layer in two tensors without a `.weight` suffix.
    checkpoint_renames = ((r"(\.mlp\.experts\.(?:gate_up_proj|down_proj))$", r"\1.weight"),)

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        # qkv_bias (default on) biases q, k and v; o_proj never has a bias.
        spec = dataclasses.replace(spec, qkv_bias=bool(spec.raw.get("qkv_bias", True)), o_bias=False)
        super().__init__(spec, max_len)
        experts = expert_packed_modules(
            int(spec.raw.get("num_experts") or 0), {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        )
        # Per-expert names first: `.experts.3.gate_proj.` must not be taken for a dense MLP's `.gate_proj.`.
        self.packed_modules = {**experts, **LlamaForCausalLM.packed_modules}
