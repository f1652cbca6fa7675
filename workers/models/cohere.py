"""Cohere (Command-R): attention and a SwiGLU MLP in parallel off one bias-free LayerNorm
(h = h + attn(norm(h)) + mlp(norm(h))), rotary over interleaved pairs (2i, 2i + 1: transformers repeats each
frequency twice and rotates odd/even features, the GPT-J layout), optional per-head q/k LayerNorms (use_qk_norm,
weight [heads, head_dim]), logits multiplied by logit_scale, and (in its checkpoints) a tied LM head.

Tensor parallelism: the per-head norm weights split with the heads; the rest as for Llama.
"""
from __future__ import annotations

import torch

from rayinfer.workers.layers.layernorm_variants import BiasFreeLayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel
from rayinfer.workers.models.llama_variants import ParallelResidualLayer, VariantAttention


class CohereAttention(VariantAttention):
    rotary_is_neox = False

    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__(spec, layer_index)
        if spec.raw.get("use_qk_norm", False):
            self.add_per_head_qk_norms(spec.rms_norm_eps)


class CohereDecoderLayer(ParallelResidualLayer):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__(
            BiasFreeLayerNorm(spec.hidden_size, spec.rms_norm_eps), CohereAttention(spec, layer_index), LlamaMLP(spec)
        )


class CohereModel(LlamaModel):
    layer_cls = CohereDecoderLayer
    norm_cls = BiasFreeLayerNorm


class CohereForCausalLM(LlamaForCausalLM):
    model_cls = CohereModel

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__(spec, max_len)
        scale = spec.raw.get("logit_scale", 0.0625)  # transformers' default when config.json leaves it out
        self.logit_scale = 1.0 if scale is None else float(scale)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.logit_scale
