"""Decoder shared by GPT-J, GPT-NeoX, Falcon and Phi: LayerNorm blocks whose attention rotates only part of each
head (partial rotary, GPT-J's interleaved style or the neox halves; ALiBi Falcons rotate nothing) and whose MLP is
not gated.

A `BlockLayout` states what differs per family; each family's file builds one from its config and declares its
checkpoint names. Residual styles (transformers' addition order, so float32 results agree bit for bit):
  parallel:   h = (attn(ln_1(h)) + mlp(ln_2(h))) + h, with ln_2 = ln_1 when the family has one norm
  sequential: h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))

Tensor parallelism: heads and MLP features split as in Llama; per-head q/k norms (Phi) share one weight; ALiBi
slopes (Falcon) are cut to each rank's heads; the fused qkv layouts pick each rank's heads when loading
(`FusedQKVParallelLinear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention
from rayinfer.workers.layers.biased_lm_head import BiasedLMHead
from rayinfer.workers.layers.dense_mlp import DenseMLP
from rayinfer.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from rayinfer.workers.layers.fused_qkv import FusedQKVLayout, FusedQKVParallelLinear
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.layers.linear import QKVParallelLinear, RowParallelLinear
from rayinfer.workers.layers.rotary import RotaryEmbedding
from rayinfer.workers.model_config import ModelSpec, RopeSpec

RopeTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos table, sin table, row per token


@dataclass(frozen=True)
class BlockLayout:
    norm_eps: float
    activation: str
    rope: RopeSpec  # rot_dim: how many leading features of each head rotate
    neox_rotary: bool  # False: GPT-J style, feature 2i pairs with 2i + 1
    parallel_residual: bool
    two_norms: bool  # a second LayerNorm before the MLP (always so in the sequential style)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool = False
    qk_norm: bool = False  # Phi's qk_layernorm: LayerNorm over each head of q and k, before rotary
    fused_qkv: FusedQKVLayout | None = None  # None: separate q_proj/k_proj/v_proj tensors
    # ALiBi instead of rotary: per-head slopes of the bias added to the scaled scores (slope * (k_pos - q_pos)).
    alibi_slopes: torch.Tensor | None = None
    activation_field: str = "hidden_act"  # the config key naming the activation, for error messages


class RotaryAttention(nn.Module):
    """Attention with (partial) rotary positions, or ALiBi where the layout gives slopes."""

    def __init__(self, spec: ModelSpec, layout: BlockLayout) -> None:
        super().__init__()
        hidden, head_dim = spec.hidden_size, spec.head_dim
        if layout.fused_qkv is None:
            self.qkv_proj = QKVParallelLinear(hidden, head_dim, spec.num_heads, spec.num_kv_heads, layout.qkv_bias)
        else:
            self.qkv_proj = FusedQKVParallelLinear(hidden, layout.fused_qkv, layout.qkv_bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.neox_rotary = layout.neox_rotary
        self.o_proj = RowParallelLinear(spec.num_heads * head_dim, hidden, bias=layout.o_bias)
        self.q_norm = LayerNorm(head_dim, layout.norm_eps) if layout.qk_norm else None
        self.k_norm = LayerNorm(head_dim, layout.norm_eps) if layout.qk_norm else None
        local_heads = self.qkv_proj.num_heads
        if layout.alibi_slopes is None:
            self.attn = PagedAttention(local_heads, self.qkv_proj.num_kv_heads, head_dim, None)
        else:  # this rank's heads' slopes
            first = self.qkv_proj.tp.rank * local_heads
            slopes = layout.alibi_slopes[first : first + local_heads]
            self.attn = PagedAttention(local_heads, self.qkv_proj.num_kv_heads, head_dim, None, alibi_slopes=slopes)
        self.rotary = layout.alibi_slopes is None

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        tokens = x.shape[0]
        q = q.reshape(tokens, -1, self.head_dim)
        k = k.reshape(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            cos, sin, rows = rope
            kernels.rotary_embedding(rows, q, k, cos, sin, self.neox_rotary)
        return self.o_proj(self.attn(q, k, v, meta))


class ParallelResidualLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layout: BlockLayout) -> None:
        super().__init__()
        self.parallel_residual = layout.parallel_residual
        self.input_layernorm = LayerNorm(spec.hidden_size, layout.norm_eps)
        needs_second = layout.two_norms or not layout.parallel_residual
        self.post_attention_layernorm = LayerNorm(spec.hidden_size, layout.norm_eps) if needs_second else None
        self.self_attn = RotaryAttention(spec, layout)
        self.mlp = DenseMLP(
            spec.hidden_size, spec.intermediate_size, layout.activation, layout.mlp_bias, layout.activation_field
        )

    def forward(self, h: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(h)
        attn_out = self.self_attn(normed, rope, meta)
        if not self.parallel_residual:
            h = h + attn_out
            return h + self.mlp(self.post_attention_layernorm(h))
        mlp_in = normed if self.post_attention_layernorm is None else self.post_attention_layernorm(h)
        return attn_out + self.mlp(mlp_in) + h


class ParallelResidualModel(nn.Module):
    def __init__(self, spec: ModelSpec, layout: BlockLayout, max_len: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(ParallelResidualLayer(spec, layout) for _ in range(spec.num_layers))
        self.norm = LayerNorm(spec.hidden_size, layout.norm_eps)
        self.rotary_emb = RotaryEmbedding(layout.rope, max_len)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        rope = self.rotary_emb(meta.positions, meta.rope_lengths)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, rope, meta)
        return self.norm(h)


class ParallelResidualForCausalLM(nn.Module):
    """Base of the family classes: they set `block_layout` and their checkpoint names (see weight_loader)."""

    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    ignored_checkpoint_tensors: tuple[str, ...] = ()

    @classmethod
    def block_layout(cls, spec: ModelSpec) -> BlockLayout:
        raise NotImplementedError(f"{cls.__name__} must describe its block layout")

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        self.spec = spec
        layout = self.block_layout(spec)
        self.model = ParallelResidualModel(spec, layout, max_len)
        head_cls = BiasedLMHead if layout.lm_head_bias else ParallelLMHead
        self.lm_head = head_cls(spec.vocab_size, spec.hidden_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def uses_dynamic_rope(self) -> bool:
        return self.model.rotary_emb.is_dynamic

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
