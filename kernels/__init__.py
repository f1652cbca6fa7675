"""Device ops of the forward pass. Each op is a Triton kernel beside the torch reference it must match;
`dispatch.dispatched` picks one per call (Triton for CUDA tensors, or as RAYINFER_KERNEL_BACKEND says)."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages
from rayinfer.kernels import activation, attention_reference, attention_triton, cpu_attention, kv_cache_write
from rayinfer.kernels import moe, norm, rotary, sampling_cpu, sampling_reference, sampling_triton
from rayinfer.kernels.dispatch import dispatched, kernel_backend

silu_and_mul = dispatched(activation.silu_and_mul_reference, activation.silu_and_mul_triton)
gelu_and_mul = dispatched(activation.gelu_and_mul_reference, activation.gelu_and_mul_triton)
rms_norm = dispatched(norm.rms_norm_reference, norm.rms_norm_triton)
fused_add_rms_norm = dispatched(norm.fused_add_rms_norm_reference, norm.fused_add_rms_norm_triton)
layer_norm = dispatched(norm.layer_norm_reference, norm.layer_norm_triton)
rotary_embedding = dispatched(rotary.rotary_embedding_reference, rotary.rotary_embedding_triton)
write_kv = dispatched(kv_cache_write.write_kv_reference, kv_cache_write.write_kv_triton)
paged_attention = dispatched(
    attention_reference.paged_attention_reference,
    attention_triton.paged_attention_triton,
    cpu_attention.paged_attention_cpu,
)
fused_moe = dispatched(moe.fused_moe_reference, moe.fused_moe_triton)
sample_filtered = dispatched(
    sampling_reference.sample_filtered_reference,
    sampling_triton.sample_filtered_triton,
    sampling_cpu.sample_filtered_cpu,
)

__all__ = [
    "fused_add_rms_norm",
    "fused_moe",
    "gelu_and_mul",
    "kernel_backend",
    "layer_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "sample_filtered",
    "silu_and_mul",
    "write_kv",
]
