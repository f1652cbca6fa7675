"""Bloom: ALiBi instead of position embeddings, a LayerNorm right after the token embedding
(word_embeddings_layernorm), per-head fused query_key_value, tanh-approximated GELU, tied LM head.

query_key_value's rows are [heads, 3, head_dim]; a tensor-parallel rank's heads are one contiguous block of rows,
and it takes the ALiBi slopes of those heads. With apply_residual_connection_post_layernorm the residual adds carry
the normed inputs instead of the block inputs.

Bloom's GELU is 0.5x(1 + tanh(0.79788456 x (1 + 0.044715 x^2))): the tanh approximation of torch (the constant is
sqrt(2/pi) rounded to the same float32). pretraining_tp with slow_but_exact only makes transformers sum the output
projections in slices: the same product, so it needs nothing here.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.alibi import rank_alibi_slopes
from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.dense_mlp import DenseMLP
from rayinfer.workers.layers.embedding import VocabParallelEmbedding
from rayinfer.workers.layers.fused_qkv import FusedQKVLayout, FusedQKVParallelLinear
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.layer_norm_decoder import LayerNormCausalLM, LayerNormDecoderLayer, SelfAttention
from rayinfer.workers.parallel_state import tp_group

BLOOM_ACTIVATION = "gelu_pytorch_tanh"


class BloomModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        hidden, eps = spec.hidden_size, float(spec.raw.get("layer_norm_epsilon", 1e-5))
        residual_from_norm = bool(spec.raw.get("apply_residual_connection_post_layernorm", False))
        tp = tp_group()
        slopes = rank_alibi_slopes(spec.num_heads, tp.rank, tp.size)
        self.output_size = hidden
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, hidden)
        self.embed_layernorm = LayerNorm(hidden, eps)
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(
                SelfAttention(
                    FusedQKVParallelLinear(
                        hidden, FusedQKVLayout("per_head", spec.num_heads, spec.num_heads, spec.head_dim), bias=True
                    ),
                    spec.num_heads,
                    hidden,
                    out_bias=True,
                    scale=spec.head_dim**-0.5,
                    alibi_slopes=slopes.clone(),
                ),
                DenseMLP(hidden, spec.intermediate_size, BLOOM_ACTIVATION),
                hidden,
                eps,
                residual_from_norm=residual_from_norm,
            )
            for _ in range(spec.num_layers)
        )
        self.norm = LayerNorm(hidden, eps)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_layernorm(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, meta)
        return self.norm(x)


class BloomForCausalLM(LayerNormCausalLM):
    model_cls = BloomModel
    # HF names with (BloomForCausalLM) or without (bigscience/bloom-* checkpoints) the `transformer.` prefix.
    checkpoint_renames = (
        (r"^transformer\.", ""),
        (r"^word_embeddings\.", "model.embed_tokens."),
        (r"^word_embeddings_layernorm\.", "model.embed_layernorm."),
        (r"^ln_f\.", "model.norm."),
        (r"^h\.(\d+)\.", r"model.layers.\1."),
        (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.proj."),
    )
