"""y = x @ W.T for FP8 (e4m3) weights: the torch reference, the CPU path and the CUDA paths.

Layout: weight float8_e4m3fn [N, K]; weight_scale float32, one of
  per-tensor  [] or [1];
  per-channel [N] or [N, 1];
  block-wise  [ceil(N / bn), ceil(K / bk)] with block_size = (bn, bk) (transformers' fine-grained FP8, DeepSeek):
  W[n, k] = weight[n, k] * weight_scale[n // bn, k // bk].
act_quant=False is W8A16 (dequantised weights, activations as they are); act_quant=True is W8A8 with dynamic
per-token activation scales: x_scale[m] = max(amax|x[m]| / 448, MIN_ACT_SCALE), x_q = e4m3(x / x_scale), and
y = (x_q * x_scale) @ W.T.

CUDA: `torch._scaled_mm` with row-wise scales (per-token x, per-channel W, bfloat16 out) for W8A8 where the device
has FP8 tensor cores; otherwise the Triton kernel of quant_matmul_triton.py, which reads the e4m3 bytes and
dequantises in registers (as fp8 loads where Triton has them, decoded arithmetically from bytes where not).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rayinfer.kernels.quant_matmul import check_activations
from rayinfer.kernels.quant_matmul_triton import launch_quant_matmul

FP8_MAX = 448.0
# vLLM's floor for dynamic scales: an all-zero row gets a tiny positive scale instead of dividing by zero.
MIN_ACT_SCALE = 1.0 / (FP8_MAX * 512.0)
# Tests set this to run the Triton kernel's byte-decoding path on a device (or interpreter) that has fp8 loads.
FORCE_FP8_AS_BITS: bool = False


def check_fp8_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None
) -> tuple[int, int]:
    """(N, K) of an FP8 weight; raises ValueError naming what does not fit."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"weight must be float8_e4m3fn [N, K] (got {weight.dtype} {tuple(weight.shape)})")
    n_out, k_in = weight.shape
    if weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 (got {weight_scale.dtype})")
    if block_size is None:
        if weight_scale.numel() not in (1, n_out) or weight_scale.dim() > 2:
            raise ValueError(f"weight_scale {tuple(weight_scale.shape)}: per-tensor [1] or per-channel [{n_out}]")
    else:
        bn, bk = block_size
        expected = (-(-n_out // bn), -(-k_in // bk))
        if bn <= 0 or bk <= 0 or tuple(weight_scale.shape) != expected:
            raise ValueError(f"block-wise weight_scale {tuple(weight_scale.shape)} must be {expected} for {block_size}")
    return n_out, k_in


def e4m3_over_256(weight: torch.Tensor) -> torch.Tensor:
    """float32 weight / 256, exactly, six times faster than torch's CPU float8 conversion: the sign-extended byte
    shifted left 7 puts e4m3's exponent and mantissa into a float16's and its sign on top; bit 14 is cleared."""
    half_bits = (weight.view(torch.int8).to(torch.int16) << 7) & ~0x4000
    return half_bits.view(torch.float16).float()


def dequantize_fp8_weight(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [N, K]: weight * its scale in float32, then cast to dtype. (The 256 moves from the decoded weight into the
    scale, which changes nothing: a power of two multiplies exactly.)"""
    n_out, k_in = check_fp8_weight(weight, weight_scale, block_size)
    weight_over_256, scale = e4m3_over_256(weight), weight_scale * 256.0
    if block_size is None:
        return (weight_over_256 * scale.reshape(-1, 1)).to(dtype)  # [1, 1] or [N, 1], broadcast
    bn, bk = block_size
    if n_out % bn == 0 and k_in % bk == 0:  # whole blocks: broadcast, 10x faster than expanding the scales
        blocks = weight_over_256.view(n_out // bn, bn, k_in // bk, bk) * scale[:, None, :, None]
        return blocks.view(n_out, k_in).to(dtype)
    scale = scale.repeat_interleave(bn, dim=0)[:n_out].repeat_interleave(bk, dim=1)[:, :k_in]
    return (weight_over_256 * scale).to(dtype)


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q float8_e4m3fn [M, K], x_scale float32 [M]): each row scaled so its largest magnitude maps to 448."""
    x32 = x.float()
    x_scale = (x32.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_ACT_SCALE)
    x_q = (x32 / x_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_q, x_scale


def fp8_matmul_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """The definition: W dequantised in float32 and rounded to x's dtype; activations as they are (W8A16) or
    x_q * x_scale in float32 (W8A8); the product accumulated in float32; the result in x's dtype."""
    _, k_in = check_fp8_weight(weight, weight_scale, block_size)
    check_activations(x, k_in)
    w = dequantize_fp8_weight(weight, weight_scale, block_size, dtype=x.dtype).float()
    if act_quant:
        x_q, x_scale = quantize_activations_per_token(x)
        return F.linear(x_q.float() * x_scale[:, None], w).to(x.dtype)
    return F.linear(x.float(), w).to(x.dtype)


def fp8_matmul_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """CPU path, always W8A16 (act_quant is ignored): dequantise this layer's W per call and run the ordinary
    `linear(x, W)` in x's dtype, so a float32 run equals the float model on the FP8 grid bit for bit."""
    _, k_in = check_fp8_weight(weight, weight_scale, block_size)
    check_activations(x, k_in)
    return linear(x, dequantize_fp8_weight(weight, weight_scale, block_size, dtype=x.dtype))


def _fp8_as_bits(device: torch.device) -> bool:
    """Whether the kernel must decode e4m3 bytes itself: Triton has fp8e4nv only from compute capability 8.9."""
    if FORCE_FP8_AS_BITS:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def fp8_matmul_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """Triton `fp8_matmul_reference`: W's bytes dequantised in registers, multiplied in x's dtype (W8A16) or, with
    act_quant, on the exact e4m3 activations, their per-token scales applied to the float32 sums."""
    n_out, k_in = check_fp8_weight(weight, weight_scale, block_size)
    check_activations(x, k_in)
    as_bits = _fp8_as_bits(x.device)
    x_scale = None
    x_in = x
    if act_quant:
        x_in, x_scale = quantize_activations_per_token(x)
        x_in = x_in.view(torch.uint8) if as_bits else x_in
    w = weight.view(torch.uint8) if as_bits else weight
    if block_size is None:
        # Per-channel (or per-tensor, stride 0) scales: one "block" of a single row spanning all of K.
        scale = weight_scale.reshape(-1)
        scale_strides = (0, scale.stride(0) if scale.numel() > 1 else 0)
        group = (k_in, 1)
    else:
        scale = weight_scale
        scale_strides = (scale.stride(1), scale.stride(0))
        group = (block_size[1], block_size[0])
    return launch_quant_matmul(
        x_in, x_scale, x.dtype, n_out,
        (w, scale, scale, scale),  # no zero points or g_idx for FP8: the scale stands in, never read
        (weight.stride(1), weight.stride(0), *scale_strides, 0, 0),
        group, is_fp8=True, fp8_as_bits=as_bits,
    )


@functools.lru_cache(maxsize=None)
def _rowwise_scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes row-wise scales here (torch builds differ: some need sm90, some sm89)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    ones_a, ones_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=ones_a, scale_b=ones_b, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def can_use_scaled_mm(x: torch.Tensor, weight: torch.Tensor, block_size: tuple[int, int] | None) -> bool:
    """_scaled_mm's row-wise W8A8: per-channel (or per-tensor) weight scales, bfloat16 activations (its only
    row-wise output dtype), K and N multiples of 16, a contiguous weight."""
    n_out, k_in = weight.shape
    return (
        block_size is None
        and x.dtype == torch.bfloat16
        and k_in % 16 == 0
        and n_out % 16 == 0
        and weight.is_contiguous()
        and _rowwise_scaled_mm_works(x.device)
    )


def fp8_scaled_mm_rowwise(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 through torch._scaled_mm: per-token x scales [M, 1], per-channel W scales [1, N], bfloat16 out."""
    n_out, k_in = check_fp8_weight(weight, weight_scale, None)
    check_activations(x, k_in)
    x_q, x_scale = quantize_activations_per_token(x)
    w_scale = weight_scale.reshape(1, -1).expand(1, n_out).contiguous()
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale[:, None], scale_b=w_scale, out_dtype=torch.bfloat16)
    return y.to(x.dtype)


def fp8_matmul_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """The accelerated path: _scaled_mm for W8A8 where `can_use_scaled_mm`, else the Triton kernel (which is also
    what CPU tensors get under TRITON_INTERPRET=1)."""
    if act_quant and x.is_cuda and can_use_scaled_mm(x, weight, block_size):
        return fp8_scaled_mm_rowwise(x, weight, weight_scale)
    return fp8_matmul_triton(x, weight, weight_scale, block_size, act_quant)
