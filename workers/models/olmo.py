"""OLMo (v1): the Llama decoder with non-parametric LayerNorms (no weight, no bias; eps fixed at 1e-5 by
transformers, set by `normalize_olmo_config` in hf_config) and `clip_qkv`, which clamps q, k and v to
[-clip_qkv, clip_qkv] right after the projection. Both are elementwise or per token, so tensor parallelism works
as for Llama."""
from __future__ import annotations

from rayinfer.workers.layers.layernorm_variants import NonParametricLayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from rayinfer.workers.models.llama_variants import VariantAttention


class OlmoAttention(VariantAttention):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        clip = spec.raw.get("clip_qkv")
        super().__init__(spec, layer_index, clip_qkv=None if clip is None else float(clip))


class OlmoDecoderLayer(LlamaDecoderLayer):
    attention_cls = OlmoAttention
    norm_cls = NonParametricLayerNorm


class OlmoModel(LlamaModel):
    layer_cls = OlmoDecoderLayer
    norm_cls = NonParametricLayerNorm


class OlmoForCausalLM(LlamaForCausalLM):
    model_cls = OlmoModel
