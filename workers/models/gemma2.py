"""Gemma 2: Gemma plus a norm after each sublayer as well as before (post_attention_layernorm,
pre_feedforward_layernorm, post_feedforward_layernorm), all (1 + weight) RMSNorms.

The rest is `ModelSpec`, read by the Llama pieces: attention scale query_pre_attn_scalar ** -0.5, tanh soft-capping
of the attention scores (attn_logit_softcapping, per head) and of the logits (final_logit_softcapping, elementwise
on the gathered logits), and the sliding window on the layers that layer_types marks sliding_attention.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.gemma import GemmaMLP, GemmaModel, GemmaRMSNorm
from rayinfer.workers.models.llama import LlamaAttention, LlamaForCausalLM, RopeTables, norm_input


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__()
        size, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = LlamaAttention(spec, layer_index)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GemmaMLP(spec)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same contract as the Llama layer: the stream is x + residual; the last add is folded into model.norm.
        x, residual = norm_input(self.input_layernorm, x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, rope, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2Model(GemmaModel):
    layer_cls = Gemma2DecoderLayer


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model
