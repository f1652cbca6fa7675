"""Device ops of the forward pass. Each op is a Triton kernel beside the torch reference it must match;
`dispatch.dispatched` picks one per call (Triton for CUDA tensors, or as RAYINFER_KERNEL_BACKEND says)."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages
from rayinfer.kernels import activation, attention_reference, attention_triton, cpu_attention, kv_cache_write
from rayinfer.kernels import fp8_matmul, moe, norm, quant_matmul, quant_matmul_triton, rotary, sampling_cpu
from rayinfer.kernels import sampling_reference, sampling_triton
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
# Quantised linears: a weight's packed layout in, y = x @ W.T out (see quant_matmul.py and fp8_matmul.py).
int_quant_matmul = dispatched(
    quant_matmul.int_quant_matmul_reference,
    quant_matmul_triton.int_quant_matmul_triton,
    quant_matmul.int_quant_matmul_cpu,
)
fp8_quant_matmul = dispatched(fp8_matmul.fp8_matmul_reference, fp8_matmul.fp8_matmul_cuda, fp8_matmul.fp8_matmul_cpu)
fused_moe = dispatched(moe.fused_moe_reference, moe.fused_moe_triton)
sample_filtered = dispatched(
    sampling_reference.sample_filtered_reference,
    sampling_triton.sample_filtered_triton,
    sampling_cpu.sample_filtered_cpu,
)

__all__ = [
    "fused_add_rms_norm",
    "fp8_quant_matmul",
    "fused_moe",
    "gelu_and_mul",
    "int_quant_matmul",
    "kernel_backend",
    "layer_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "sample_filtered",
    "silu_and_mul",
    "write_kv",
]
