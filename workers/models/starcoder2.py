"""Starcoder2: the Llama block with biased LayerNorms (norm_epsilon), biases on every projection (use_bias), a
non-gated GELU MLP (c_fc -> gelu -> c_proj), GQA and an optional sliding window over every layer.

`normalize_starcoder2_config` (hf_config) maps norm_epsilon and use_bias onto the common keys. The MLP splits
c_fc by columns and c_proj by rows, so tensor parallelism works as for Llama.
"""
from __future__ import annotations

from rayinfer.workers.layers.dense_mlp import DenseMLP
from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Starcoder2MLP(DenseMLP):
    """c_fc -> GELU ("gelu" is the exact erf form here, "gelu_pytorch_tanh" the tanh one) -> c_proj."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias, field="hidden_act")


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    mlp_cls = Starcoder2MLP
    norm_cls = LayerNorm


class Starcoder2Model(LlamaModel):
    layer_cls = Starcoder2DecoderLayer
    norm_cls = LayerNorm


class Starcoder2ForCausalLM(LlamaForCausalLM):
    model_cls = Starcoder2Model
    checkpoint_renames = ((r"\.mlp\.c_fc\.", ".mlp.fc."), (r"\.mlp\.c_proj\.", ".mlp.proj."))
