"""StableLM: the Llama decoder with biased LayerNorms (layer_norm_eps), partial rotary (partial_rotary_factor,
read by `load_model_spec`), q/k/v biases without an o_proj bias (use_qkv_bias), optional per-head q/k LayerNorms
(qk_layernorm: one bias-free LayerNorm per head, weights stored per head as q_layernorm.norms.<h>.weight) and,
with use_parallel_residual, attention and MLP in parallel off one input norm.

Tensor parallelism: the per-head norms split with the heads (each rank loads its heads' weights), the rest as
for Llama.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from rayinfer.workers.models.llama_variants import ParallelResidualLayer, VariantAttention


class StableLmAttention(VariantAttention):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__(spec, layer_index)
        if spec.raw.get("qk_layernorm", False):
            self.add_per_head_qk_norms(spec.rms_norm_eps, q_name="q_layernorm", k_name="k_layernorm")


class StableLmDecoderLayer(LlamaDecoderLayer):
    attention_cls = StableLmAttention
    norm_cls = LayerNorm


def stablelm_layer(spec: ModelSpec, layer_index: int) -> nn.Module:
    if not spec.raw.get("use_parallel_residual", False):
        return StableLmDecoderLayer(spec, layer_index)
    norm = LayerNorm(spec.hidden_size, spec.rms_norm_eps)
    return ParallelResidualLayer(norm, StableLmAttention(spec, layer_index), LlamaMLP(spec))


class StableLmModel(LlamaModel):
    layer_cls = staticmethod(stablelm_layer)
    norm_cls = LayerNorm


class StableLmForCausalLM(LlamaForCausalLM):
    model_cls = StableLmModel
    # One LayerNorm per head in the checkpoint; PerHeadLayerNorm stacks them (its loader reads the head index).
    checkpoint_renames = ((r"\.(q|k)_layernorm\.norms\.\d+\.weight$", r".\1_layernorm.weight"),)

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        # use_qkv_bias biases q, k and v only; o_proj never has one.
        spec = dataclasses.replace(spec, qkv_bias=bool(spec.raw.get("use_qkv_bias", False)), o_bias=False)
        super().__init__(spec, max_len)
