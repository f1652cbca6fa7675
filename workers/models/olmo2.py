"""OLMo 2: q/k RMSNorm over the whole projection (all heads at once) and norms after each sublayer, not before.

Block: h = h + post_attention_layernorm(attn(h)); h = h + post_feedforward_layernorm(mlp(h)); no input norm.

Tensor parallelism: refused (tensor_parallel_size must be 1). q_norm/k_norm take the mean square over every
head's features, so a rank holding some heads would need an all-reduce of its partial sums of squares (and care
with replicated KV heads); `check_tensor_parallel` fails early with a clear message instead, and so does this class.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.norm import RMSNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel, RopeTables
from rayinfer.workers.parallel_state import tp_group


class Olmo2Attention(LlamaAttention):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        if tp_group().size != 1:
            raise ValueError(
                f"{spec.architecture} needs tensor_parallel_size 1: its q/k norm spans all heads of the projection"
            )
        super().__init__(spec, layer_index)
        self.q_norm = RMSNorm(spec.num_heads * spec.head_dim, spec.rms_norm_eps)
        self.k_norm = RMSNorm(spec.num_kv_heads * spec.head_dim, spec.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q.contiguous()), self.k_norm(k.contiguous())


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(spec, layer_index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = LlamaMLP(spec)
        self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same contract as the Llama layer: the stream is x + residual; the last add is folded into model.norm.
        h = x if residual is None else residual + x
        h = h + self.post_attention_layernorm(self.self_attn(h, rope, meta))
        return self.post_feedforward_layernorm(self.mlp(h)), h


class Olmo2Model(LlamaModel):
    layer_cls = Olmo2DecoderLayer


class Olmo2ForCausalLM(LlamaForCausalLM):
    model_cls = Olmo2Model
