"""OPT: learned positions read 2 rows into their table, LayerNorm blocks that are pre-norm (do_layer_norm_before,
most sizes) or post-norm (opt-350m), ReLU MLP (fc1/fc2), optional biases (enable_bias), and for
word_embed_proj_dim != hidden_size a project_in after the token embedding and a project_out before the LM head
(which then works in the narrower embedding width). The final LayerNorm exists only for pre-norm models.

q_proj/k_proj/v_proj load into one q/k/v projection split by heads; project_in/out are small and replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.layers.dense_mlp import DenseMLP
from rayinfer.workers.layers.embedding import VocabParallelEmbedding
from rayinfer.workers.layers.fused_qkv import FusedQKVLayout, FusedQKVParallelLinear
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.layers.position_embedding import LearnedPositionEmbedding
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.layer_norm_decoder import LayerNormCausalLM, LayerNormDecoderLayer, SelfAttention

OPT_POSITION_OFFSET = 2  # OPT's table has 2 extra leading rows (a fairseq padding_idx leftover)
OPT_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default; OPT configs have no eps field


class ReplicatedLinear(nn.Module):
    """A bias-free linear held whole by every rank (OPT's project_in / project_out)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class OPTModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        raw, hidden = spec.raw, spec.hidden_size
        bias = bool(raw.get("enable_bias", True))
        affine = bool(raw.get("layer_norm_elementwise_affine", True))
        norm_before = bool(raw.get("do_layer_norm_before", True))
        embed_dim = int(raw.get("word_embed_proj_dim") or hidden)
        self.output_size = embed_dim
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, embed_dim)
        self.embed_positions = LearnedPositionEmbedding(
            spec.max_position_embeddings + OPT_POSITION_OFFSET, hidden, offset=OPT_POSITION_OFFSET
        )
        projected = embed_dim != hidden
        self.project_in = ReplicatedLinear(embed_dim, hidden) if projected else None
        self.project_out = ReplicatedLinear(hidden, embed_dim) if projected else None
        activation = raw.get("activation_function") or "relu"
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(
                SelfAttention(
                    FusedQKVParallelLinear(
                        hidden, FusedQKVLayout("blocks", spec.num_heads, spec.num_heads, spec.head_dim), bias=bias
                    ),
                    spec.num_heads,
                    hidden,
                    out_bias=bias,
                    scale=spec.head_dim**-0.5,
                ),
                DenseMLP(hidden, spec.intermediate_size, activation, bias=bias),
                hidden,
                OPT_LAYER_NORM_EPS,
                norm_before=norm_before,
                elementwise_affine=affine,
            )
            for _ in range(spec.num_layers)
        )
        final_norm = norm_before and not raw.get("_remove_final_layer_norm", False)
        self.norm = LayerNorm(hidden, OPT_LAYER_NORM_EPS, elementwise_affine=affine) if final_norm else None

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(meta.positions)
        for layer in self.layers:
            x = layer(x, meta)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTForCausalLM(LayerNormCausalLM):
    model_cls = OPTModel
    # HF names: model.decoder.* (OPTForCausalLM) or decoder.* (OPTModel checkpoints such as facebook/opt-*).
    checkpoint_renames = (
        (r"^(model\.)?decoder\.", "model."),
        (r"^model\.final_layer_norm\.", "model.norm."),
        (r"\.self_attn_layer_norm\.", ".input_layernorm."),
        (r"\.final_layer_norm\.", ".post_attention_layernorm."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.fc1\.", ".mlp.fc."),
        (r"\.fc2\.", ".mlp.proj."),
    )
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}
