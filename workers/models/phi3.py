"""Phi-3: the Llama decoder whose checkpoint fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj
(gate rows first), with an optional sliding window and partial rotary (both read by `load_model_spec`).

The fused tensors are cut into their parts by a declared loader (`fused_rows_loader`) that hands each part to our
packed parameters' shard loaders, so tensor parallelism splits Phi-3 like Llama. LongRoPE (rope_scaling type
longrope/su) is refused when the config is read (see `normalize_phi3_config` in hf_config).
"""
from __future__ import annotations

from rayinfer.workers.layers.checkpoint_views import fused_rows_loader
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)


class Phi3Attention(LlamaAttention):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__(spec, layer_index)
        q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        weight = self.qkv_proj.weight
        weight.weight_loader = fused_rows_loader(weight.weight_loader, [("q", q_rows), ("k", kv_rows), ("v", kv_rows)])


class Phi3MLP(LlamaMLP):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        size = spec.intermediate_size
        weight = self.gate_up_proj.weight
        weight.weight_loader = fused_rows_loader(weight.weight_loader, [(0, size), (1, size)])


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP


class Phi3Model(LlamaModel):
    layer_cls = Phi3DecoderLayer


class Phi3ForCausalLM(LlamaForCausalLM):
    model_cls = Phi3Model
