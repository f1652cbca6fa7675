"""GPT-BigCode (StarCoder, SantaCoder's successors): GPT-2's block with nn.Linear weights and multi-query attention.

c_attn's layout depends on multi_query: with it, all of q then ONE k head then one v head (column blocks; the KV
head is replicated on every tensor-parallel rank); without it, transformers views the output as [heads, 3,
head_dim], so the rows are grouped per head and a rank's heads are one contiguous block of rows.
"""
from __future__ import annotations

from torch import nn

from rayinfer.workers.layers.fused_qkv import FusedQKVLayout, FusedQKVParallelLinear
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.gpt2 import GPT2_RENAMES, GPT2LMHeadModel, GPT2Model


class GPTBigCodeModel(GPT2Model):
    transposed_weights = False
    default_activation = "gelu_pytorch_tanh"

    def attention_scale(self, spec: ModelSpec, layer_index: int) -> float:
        return spec.head_dim**-0.5 if spec.raw.get("scale_attn_weights", True) else 1.0

    def qkv_proj(self, spec: ModelSpec) -> nn.Module:
        if spec.raw.get("multi_query", True):
            layout = FusedQKVLayout("blocks", spec.num_heads, 1, spec.head_dim)
        else:
            layout = FusedQKVLayout("per_head", spec.num_heads, spec.num_heads, spec.head_dim)
        return FusedQKVParallelLinear(spec.hidden_size, layout, bias=True)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    model_cls = GPTBigCodeModel
    checkpoint_renames = GPT2_RENAMES
    ignored_checkpoint_tensors = ()
