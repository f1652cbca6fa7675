"""Phi (phi-1, phi-1.5, phi-2): one LayerNorm feeds attention and MLP in parallel; partial neox rotary
(partial_rotary_factor, 0.5 by default); biases on q/k/v, dense and the MLP; an optional LayerNorm over each
head of q and k (qk_layernorm); a final LayerNorm; an LM head with a bias."""
from __future__ import annotations

from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.parallel_residual import BlockLayout, ParallelResidualForCausalLM


class PhiForCausalLM(ParallelResidualForCausalLM):
    checkpoint_renames = (
        (r"^model\.final_layernorm\.", "model.norm."),
        (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
        (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
        (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."),
        (r"\.mlp\.fc1\.", ".mlp.fc."),
        (r"\.mlp\.fc2\.", ".mlp.proj."),
    )

    @classmethod
    def block_layout(cls, spec: ModelSpec) -> BlockLayout:
        return BlockLayout(
            norm_eps=float(spec.raw.get("layer_norm_eps", 1e-5)),
            activation=spec.hidden_act,
            rope=spec.rope,
            neox_rotary=True,
            parallel_residual=True,
            two_norms=False,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            lm_head_bias=True,
            qk_norm=bool(spec.raw.get("qk_layernorm", False)),
        )
