"""GPT-J: one LayerNorm feeds attention and MLP in parallel; GPT-J-style (interleaved) rotary over the first
`rotary_dim` features of each head with theta fixed at 10000; no attention biases; an LM head with a bias."""
from __future__ import annotations

from rayinfer.workers.model_config import ModelSpec, RopeSpec
from rayinfer.workers.models.parallel_residual import BlockLayout, ParallelResidualForCausalLM


class GPTJForCausalLM(ParallelResidualForCausalLM):
    checkpoint_renames = (
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.attn\.", ".self_attn."),
        (r"\.mlp\.fc_in\.", ".mlp.fc."),
        (r"\.mlp\.fc_out\.", ".mlp.proj."),
    )
    # Older checkpoints carry the causal-mask buffers of each attention.
    ignored_checkpoint_tensors = (r"\.attn\.(masked_)?bias$",)

    @classmethod
    def block_layout(cls, spec: ModelSpec) -> BlockLayout:
        rotary_dim = spec.raw.get("rotary_dim")
        rot_dim = spec.head_dim if rotary_dim is None else int(rotary_dim)
        if rot_dim % 2 or not 0 < rot_dim <= spec.head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be even and within the head size ({spec.head_dim})")
        # transformers' GPT-J reads no rope_theta or rope scaling: base 10000, table as long as n_positions.
        rope = RopeSpec(theta=10000.0, rot_dim=rot_dim, max_position_embeddings=spec.max_position_embeddings)
        return BlockLayout(
            norm_eps=float(spec.raw.get("layer_norm_epsilon", 1e-5)),
            activation=spec.hidden_act,
            activation_field="activation_function",
            rope=rope,
            neox_rotary=False,
            parallel_residual=True,
            two_norms=False,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=True,
            lm_head_bias=True,
        )
