"""Gemma: the Llama decoder with a GELU (tanh) gated MLP, RMSNorm scaling by (1 + weight), and token embeddings
multiplied by sqrt(hidden_size) rounded to the model dtype (as transformers does). Checkpoints tie the LM head.

`GemmaRMSNorm` adds the 1 when the checkpoint is loaded, so it runs the plain RMSNorm kernels. Everything here is
elementwise or over the full (replicated) hidden size, so tensor parallelism splits it as it does Llama.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.workers.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from rayinfer.workers.layers.norm import RMSNorm
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

if TYPE_CHECKING:
    from rayinfer.workers.checkpoint import CheckpointTensor

# transformers' activation names -> torch's gelu `approximate`. Gemma's legacy "gelu" means the tanh form
# (transformers rewrites it so too); "gelu_new" and "gelu_pytorch_tanh" are the same tanh formula.
_GELU_APPROXIMATE = {"gelu": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu_new": "tanh"}


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight w scales by (1 + w): the loader stores 1 + w (added in float32)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = self.load_offset_weight

    @staticmethod
    def load_offset_weight(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
        if tuple(param.shape) != loaded.shape:
            raise ValueError(
                f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not fit parameter {tuple(param.shape)}"
            )
        param.data.copy_(loaded.full().float() + 1.0)


class GemmaMLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(
                f"hidden_activation {spec.hidden_act!r} is not supported for {spec.architecture}; "
                f"expected one of {sorted(_GELU_APPROXIMATE)}"
            )
        self.approximate = _GELU_APPROXIMATE[spec.hidden_act]
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.gelu_and_mul(self.gate_up_proj(x), self.approximate))


class GemmaDecoderLayer(LlamaDecoderLayer):
    mlp_cls = GemmaMLP
    norm_cls = GemmaRMSNorm


def embedding_normalizer(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden_size) rounded to the model dtype, as transformers multiplies the embeddings by it."""
    return float(torch.tensor(hidden_size**0.5, dtype=dtype))


class GemmaModel(LlamaModel):
    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__(spec, max_len)
        if self.stage.is_first:  # later pipeline stages hold no embedding to scale
            self.embedding_multiplier = embedding_normalizer(spec.hidden_size, self.embed_tokens.weight.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    model_cls = GemmaModel
