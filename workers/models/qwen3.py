"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k (q_norm, k_norm) before rotary, no qkv bias."""
from __future__ import annotations

import torch

from rayinfer.workers.layers.norm import RMSNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__(spec, layer_index)
        # One weight of head_dim shared by every head: per-head norms need no change under tensor parallelism.
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = q.shape[0]
        q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(tokens, -1)
        k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(tokens, -1)
        return q, k


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
