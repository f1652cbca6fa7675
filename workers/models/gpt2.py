"""GPT-2: learned absolute positions, pre-norm LayerNorm blocks, fused c_attn, non-gated MLP, tied LM head.

Checkpoints keep Conv1D weights as [in, out]; each projection's loader reads them transposed (see
`checkpoint_views.load_transposed`), so the tensor-parallel cuts are those of ordinary linears: c_attn's q, k
and v column blocks are each split by heads, c_proj and the MLP's c_proj by input features.

Attention scale: head_dim ** -0.5 when scale_attn_weights (else 1), divided by (layer index + 1) when
scale_attn_by_inverse_layer_idx. reorder_and_upcast_attn only changes where transformers' eager path applies the
scale and that it computes scores in float32, which our kernels always do: it needs nothing here.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.attention import AttentionMetadata
from rayinfer.workers.layers.checkpoint_views import load_transposed
from rayinfer.workers.layers.dense_mlp import DenseMLP
from rayinfer.workers.layers.embedding import VocabParallelEmbedding
from rayinfer.workers.layers.fused_qkv import FusedQKVLayout, FusedQKVParallelLinear
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.layers.position_embedding import LearnedPositionEmbedding
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.layer_norm_decoder import LayerNormCausalLM, LayerNormDecoderLayer, SelfAttention


def layer_norm_eps(spec: ModelSpec) -> float:
    return float(spec.raw.get("layer_norm_epsilon", 1e-5))


class GPT2Model(nn.Module):
    # Conv1D checkpoints ([in, out] weights); GPT-BigCode uses nn.Linear and turns this off.
    transposed_weights = True
    default_activation = "gelu_new"  # the config class's default, for configs that omit activation_function

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        if spec.raw.get("add_cross_attention"):
            raise ValueError(f"add_cross_attention=True is not supported for {spec.architecture} (decoder-only engine)")
        eps = layer_norm_eps(spec)
        self.output_size = spec.hidden_size
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = LearnedPositionEmbedding(spec.max_position_embeddings, spec.hidden_size)
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(self.attention(spec, i), self.mlp(spec), spec.hidden_size, eps)
            for i in range(spec.num_layers)
        )
        self.norm = LayerNorm(spec.hidden_size, eps)
        if self.transposed_weights:
            for layer in self.layers:
                for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.fc, layer.mlp.proj):
                    load_transposed(linear)

    def attention_scale(self, spec: ModelSpec, layer_index: int) -> float:
        scale = spec.head_dim**-0.5 if spec.raw.get("scale_attn_weights", True) else 1.0
        if spec.raw.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_index + 1)
        return scale

    def qkv_proj(self, spec: ModelSpec) -> nn.Module:
        layout = FusedQKVLayout("blocks", spec.num_heads, spec.num_kv_heads, spec.head_dim)
        return FusedQKVParallelLinear(spec.hidden_size, layout, bias=True)

    def attention(self, spec: ModelSpec, layer_index: int) -> SelfAttention:
        scale = self.attention_scale(spec, layer_index)
        return SelfAttention(self.qkv_proj(spec), spec.num_heads, spec.hidden_size, out_bias=True, scale=scale)

    def mlp(self, spec: ModelSpec) -> DenseMLP:
        activation = spec.raw.get("activation_function") or self.default_activation
        return DenseMLP(spec.hidden_size, spec.intermediate_size, activation)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(meta.positions)
        for layer in self.layers:
            x = layer(x, meta)
        return self.norm(x)


# HF names (with or without the `transformer.` prefix) -> ours. GPT-BigCode's checkpoints use the same names.
GPT2_RENAMES = (
    (r"^transformer\.", ""),
    (r"^wte\.", "model.embed_tokens."),
    (r"^wpe\.", "model.embed_positions."),
    (r"^ln_f\.", "model.norm."),
    (r"^h\.(\d+)\.", r"model.layers.\1."),
    (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
    (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc."),
    (r"\.mlp\.c_proj\.", ".mlp.proj."),
)


class GPT2LMHeadModel(LayerNormCausalLM):
    model_cls = GPT2Model
    checkpoint_renames = GPT2_RENAMES
    # Older checkpoints store the causal mask buffers (attn.bias, attn.masked_bias): fixed, not weights.
    ignored_checkpoint_tensors = (r"(^|\.)attn\.(bias|masked_bias)$",)
