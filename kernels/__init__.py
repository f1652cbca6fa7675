"""Device ops of the forward pass. Each op has a plain-torch reference; Triton versions live beside them."""
from rayinfer.kernels.activation import gelu_and_mul_reference as gelu_and_mul
from rayinfer.kernels.activation import silu_and_mul_reference as silu_and_mul
from rayinfer.kernels.norm import fused_add_rms_norm_reference as fused_add_rms_norm
from rayinfer.kernels.norm import layer_norm_reference as layer_norm
from rayinfer.kernels.norm import rms_norm_reference as rms_norm
from rayinfer.kernels.paged_attention import paged_attention_reference as paged_attention
from rayinfer.kernels.paged_attention import write_kv_reference as write_kv
from rayinfer.kernels.rotary import rotary_embedding_reference as rotary_embedding

__all__ = [
    "fused_add_rms_norm",
    "gelu_and_mul",
    "layer_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv",
]
