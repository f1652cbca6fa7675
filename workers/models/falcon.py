"""Falcon: LayerNorm blocks with neox rotary over whole heads and a fused query_key_value in one of three layouts.

- new_decoder_architecture (40B/180B): GQA, rows grouped per KV head [kv, heads/kv + 2, head_dim]; attention and
  MLP in parallel off ln_attn and ln_mlp (or one input_layernorm when num_ln_in_parallel_attn is 1).
- old (7B/RW): multi_query (one KV head, rows [heads + 2, head_dim]) or per-head interleaved [heads, 3, head_dim];
  parallel_attn (one input_layernorm feeding both) or the sequential block (input_ + post_attention_layernorm).
`bias` puts biases on every linear; the LM head never has one.

ALiBi Falcons (alibi=True, e.g. falcon-rw-1b) rotate nothing: each head adds slope * key position / sqrt(head_dim)
to its scores. transformers rounds the slopes to bfloat16 (kept here) and also each slope * position product
(not reproduced: the kernels add slope * (k_pos - q_pos) in float32). Those products are exact while the slope is a
power of two (up to 8 heads, or 16 for half of them) and positions stay below 256; beyond, scores may differ from
transformers' by bfloat16 rounding of the bias.
"""
from __future__ import annotations

from dataclasses import replace

from rayinfer.workers.layers.alibi import alibi_slopes
from rayinfer.workers.layers.fused_qkv import FusedQKVLayout
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.parallel_residual import BlockLayout, ParallelResidualForCausalLM


def falcon_block_layout(spec: ModelSpec) -> BlockLayout:
    raw = spec.raw
    alibi = None
    if raw.get("alibi", False):
        alibi = alibi_slopes(spec.num_heads).bfloat16().float() * spec.head_dim**-0.5
    new_arch = bool(raw.get("new_decoder_architecture", False))
    parallel = bool(raw.get("parallel_attn", True))
    if new_arch:
        if not parallel:  # transformers' decoder layer cannot run this combination either
            raise ValueError("new_decoder_architecture=True needs parallel_attn=True")
        qkv_kind = "grouped"
        two_norms = (raw.get("num_ln_in_parallel_attn") or 2) == 2
    else:
        qkv_kind = "blocks" if raw.get("multi_query", True) else "per_head"
        two_norms = not parallel
    bias = bool(raw.get("bias", False))
    return BlockLayout(
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=spec.hidden_act,
        activation_field="activation",
        rope=replace(spec.rope, rot_dim=spec.head_dim),  # Falcon rotates whole heads
        neox_rotary=True,
        parallel_residual=parallel,
        two_norms=two_norms,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        fused_qkv=FusedQKVLayout(qkv_kind, spec.num_heads, spec.num_kv_heads, spec.head_dim),
        alibi_slopes=alibi,
    )


class FalconForCausalLM(ParallelResidualForCausalLM):
    checkpoint_renames = (
        (r"^transformer\.word_embeddings\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_attn\.", ".input_layernorm."),
        (r"\.ln_mlp\.", ".post_attention_layernorm."),
        (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.proj."),
    )

    @classmethod
    def block_layout(cls, spec: ModelSpec) -> BlockLayout:
        return falcon_block_layout(spec)
