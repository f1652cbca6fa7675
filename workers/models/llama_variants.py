"""Pieces shared by the Llama-shaped families (Phi-3, Starcoder2, OLMo, StableLM, Cohere): attention with the
knobs they turn (qkv clipping, rotary pair layout, per-head q/k norms) and the parallel attention + MLP block."""
from __future__ import annotations

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.layernorm_variants import PerHeadLayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaAttention, RopeTables, norm_input


class VariantAttention(LlamaAttention):
    """Llama attention plus: `clip_qkv` (OLMo clamps q, k and v to [-clip, clip] right after the projection),
    `rotary_is_neox` (False: GPT-J pairs (2i, 2i + 1), as Cohere rotates) and optional per-head LayerNorms of q
    and k (`add_per_head_qk_norms`), applied before rotary."""

    rotary_is_neox: bool = True

    def __init__(self, spec: ModelSpec, layer_index: int, clip_qkv: float | None = None) -> None:
        super().__init__(spec, layer_index)
        self.clip_qkv = clip_qkv
        self.qk_norm_names: tuple[str, str] | None = None  # set by add_per_head_qk_norms

    def add_per_head_qk_norms(self, eps: float, q_name: str = "q_norm", k_name: str = "k_norm") -> None:
        """Per-head q/k LayerNorms registered under the checkpoint's names; each rank keeps its own heads' rows."""
        qkv = self.qkv_proj
        rank = qkv.tp.rank
        q_norm = PerHeadLayerNorm(qkv.num_heads, self.head_dim, eps, first_head=rank * qkv.num_heads)
        kv_first = (rank // qkv.kv_replicas) * qkv.num_kv_heads  # replicated KV heads: the rank's shared head
        k_norm = PerHeadLayerNorm(qkv.num_kv_heads, self.head_dim, eps, first_head=kv_first)
        setattr(self, q_name, q_norm)
        setattr(self, k_name, k_norm)
        self.qk_norm_names = (q_name, k_name)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_norm_names is None:
            return q, k
        q_name, k_name = self.qk_norm_names
        return getattr(self, q_name)(q), getattr(self, k_name)(k)

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(q, k)
        tokens = x.shape[0]
        q = q.reshape(tokens, -1, self.head_dim)
        k = k.reshape(tokens, -1, self.head_dim)
        cos, sin, rows = rope
        kernels.rotary_embedding(rows, q, k, cos, sin, self.rotary_is_neox)
        return self.o_proj(self.attn(q, k, v, meta))


class ParallelResidualLayer(nn.Module):
    """Attention and MLP both read one input norm: h = h + attn(norm(h)) + mlp(norm(h)) (Cohere, StableLM's
    use_parallel_residual). Returned as (mlp, residual + attn), so the next layer's add gives (h + attn) + mlp in
    transformers' order."""

    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = norm_input(self.input_layernorm, x, residual)
        attn = self.self_attn(x, rope, meta)
        return self.mlp(x), residual + attn
