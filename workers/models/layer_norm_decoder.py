"""Shared pieces of the LayerNorm decoders without rotary (GPT-2, GPT-BigCode, OPT, Bloom).

A family file builds the q/k/v projection, the embeddings and the checkpoint renames; the attention wrapper, the
block (pre-norm, post-norm, or Bloom's residual taken after the norm) and the LM head are the same for all four.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention
from rayinfer.workers.layers.embedding import ParallelLMHead
from rayinfer.workers.layers.linear import RowParallelLinear
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.model_config import ModelSpec


class SelfAttention(nn.Module):
    """qkv_proj (a module with `split`, `num_heads`, `num_kv_heads`, `head_dim` for this rank) -> paged attention
    -> o_proj. `scale` multiplies q.k; `alibi_slopes` are this rank's heads' slopes."""

    def __init__(
        self,
        qkv_proj: nn.Module,
        total_heads: int,
        hidden_size: int,
        out_bias: bool,
        scale: float,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.qkv_proj = qkv_proj
        head_dim = qkv_proj.head_dim
        self.o_proj = RowParallelLinear(total_heads * head_dim, hidden_size, bias=out_bias)
        self.attn = PagedAttention(
            qkv_proj.num_heads, qkv_proj.num_kv_heads, head_dim, None, scale=scale, alibi_slopes=alibi_slopes
        )

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        return self.o_proj(self.attn(q, k, v, meta))


class LayerNormDecoderLayer(nn.Module):
    """One block. Pre-norm (norm_before): x + attn(ln1(x)), then + mlp(ln2(.)); with residual_from_norm (Bloom's
    apply_residual_connection_post_layernorm) the normed input is what each residual add carries forward.
    Post-norm (OPT-350m's do_layer_norm_before=False): ln1(x + attn(x)), then ln2(. + mlp(.))."""

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        hidden_size: int,
        eps: float,
        norm_before: bool = True,
        residual_from_norm: bool = False,
        elementwise_affine: bool = True,
    ) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(hidden_size, eps, elementwise_affine=elementwise_affine)
        self.self_attn = self_attn
        self.post_attention_layernorm = LayerNorm(hidden_size, eps, elementwise_affine=elementwise_affine)
        self.mlp = mlp
        self.norm_before = norm_before
        self.residual_from_norm = residual_from_norm

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not self.norm_before:
            x = self.input_layernorm(x + self.self_attn(x, meta))
            return self.post_attention_layernorm(x + self.mlp(x))
        normed = self.input_layernorm(x)
        x = (normed if self.residual_from_norm else x) + self.self_attn(normed, meta)
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_from_norm else x) + self.mlp(normed)


class LayerNormCausalLM(nn.Module):
    """`model` (a `model_cls`, set by each family) maps token ids to hidden states of width `model.output_size`;
    the LM head (tied to `model.embed_tokens` when the config says so) maps them to logits."""

    model_cls: type[nn.Module]
    uses_dynamic_rope = False

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = self.model_cls(spec, max_len)
        self.lm_head = ParallelLMHead(spec.vocab_size, self.model.output_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
