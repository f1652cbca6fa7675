"""Starcoder2: the Llama block with biased LayerNorms (norm_epsilon), biases on every projection (use_bias), a
non-gated GELU MLP (c_fc -> gelu -> c_proj), GQA and an optional sliding window over every layer.

`normalize_starcoder2_config` (hf_config) maps norm_epsilon and use_bias onto the common keys. The MLP splits
c_fc by columns and c_proj by rows, so tensor parallelism works as for Llama.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.workers.layers.norm import LayerNorm
from rayinfer.workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

# transformers' activation names -> torch's gelu `approximate` (here "gelu" is the exact erf form).
_GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


class Starcoder2MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(
                f"hidden_act {spec.hidden_act!r} is not supported for {spec.architecture}; "
                f"expected one of {sorted(_GELU_APPROXIMATE)}"
            )
        self.approximate = _GELU_APPROXIMATE[spec.hidden_act]
        self.c_fc = ColumnParallelLinear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.c_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An elementwise torch op: no kernel of ours to fuse it with (the MLP is not gated).
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    mlp_cls = Starcoder2MLP
    norm_cls = LayerNorm


class Starcoder2Model(LlamaModel):
    layer_cls = Starcoder2DecoderLayer
    norm_cls = LayerNorm


class Starcoder2ForCausalLM(LlamaForCausalLM):
    model_cls = Starcoder2Model
