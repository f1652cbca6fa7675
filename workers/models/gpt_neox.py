"""GPT-NeoX (Pythia): partial neox rotary (rotary_pct / partial_rotary_factor, base rotary_emb_base), a fused
query_key_value interleaved per head ([heads, 3, head_dim]), two LayerNorms per block, and either the parallel
residual (use_parallel_residual, the default) or the sequential one. The untied head is named embed_out."""
from __future__ import annotations

from rayinfer.workers.layers.fused_qkv import FusedQKVLayout
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.parallel_residual import BlockLayout, ParallelResidualForCausalLM


class GPTNeoXForCausalLM(ParallelResidualForCausalLM):
    checkpoint_renames = (
        (r"^embed_out\.", "lm_head."),
        (r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
        (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
        (r"^gpt_neox\.layers\.", "model.layers."),
        (r"\.attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.proj."),
    )
    ignored_checkpoint_tensors = (r"\.attention\.(masked_)?bias$",)  # causal-mask buffers of older checkpoints

    @classmethod
    def block_layout(cls, spec: ModelSpec) -> BlockLayout:
        bias = bool(spec.raw.get("attention_bias", True))
        return BlockLayout(
            norm_eps=float(spec.raw.get("layer_norm_eps", 1e-5)),
            activation=spec.hidden_act,
            rope=spec.rope,
            neox_rotary=True,
            parallel_residual=bool(spec.raw.get("use_parallel_residual", True)),
            two_norms=True,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=True,
            fused_qkv=FusedQKVLayout("per_head", spec.num_heads, spec.num_heads, spec.head_dim),
        )
