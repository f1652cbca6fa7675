"""y = x @ W.T for integer-quantised weights (AWQ, GPTQ, compressed-tensors W4A16/W8A16): the torch reference and
the CPU path. The Triton kernels that read the packed weights directly are in `quant_matmul_triton.py`.

Canonical layout (every checkpoint format is converted to it at load time), for `bits` in {4, 8}, pack = 32 // bits:
  qweight int32 [K // pack, N]: input row k of output column n is (qweight[k // pack, n] >> (bits * (k % pack)))
          & (2**bits - 1), unsigned, packed in sequential order along K;
  scales  [G, N] (the activation dtype or float32); zeros uint8 [G, N] (final zero points, no +1 offset);
  g_idx   int32 [K]: the group of each input row (k // group_size, or any map for GPTQ act-order).
  W[n, k] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n], computed in float32.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (4, 8)


def check_int_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> tuple[int, int]:
    """(K, N) of a weight in the canonical layout; raises ValueError naming what does not fit."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits})")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [K // {32 // bits}, N] (got {qweight.dtype} {tuple(qweight.shape)})")
    k_in, n_out = qweight.shape[0] * (32 // bits), qweight.shape[1]
    if g_idx.dim() != 1 or g_idx.numel() != k_in:
        raise ValueError(f"g_idx {tuple(g_idx.shape)} must be [K] = [{k_in}]")
    if scales.dim() != 2 or scales.shape[1] != n_out or not scales.is_floating_point():
        raise ValueError(f"scales {scales.dtype} {tuple(scales.shape)} must be floating [G, N] with N = {n_out}")
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"zeros {zeros.dtype} {tuple(zeros.shape)} must be uint8 {tuple(scales.shape)}")
    return k_in, n_out


def check_activations(x: torch.Tensor, k_in: int) -> None:
    if x.dim() != 2 or x.shape[1] != k_in:
        raise ValueError(f"x {tuple(x.shape)} must be [M, K] with K = {k_in}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16 (got {x.dtype})")


def unpack_int_weight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned values q as uint8 [N, K] (transposed, so the dequantised W comes out [N, K] contiguous).

    On a little-endian host byte j of a word holds fields 2j, 2j + 1 (4-bit, low nibble first) or field j (8-bit):
    reading bytes is a quarter of the memory traffic of shifting int32 words."""
    n_out = qweight.shape[1]
    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch platform is in use
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        fields = (qweight.t().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return fields.to(torch.uint8).reshape(n_out, -1)
    word_bytes = qweight.contiguous().view(torch.uint8).view(qweight.shape[0], n_out, 4).permute(1, 0, 2)
    if bits == 8:
        return word_bytes.reshape(n_out, -1)
    nibbles = torch.empty((n_out, qweight.shape[0], 4, 2), dtype=torch.uint8, device=qweight.device)
    torch.bitwise_and(word_bytes, 0xF, out=nibbles[..., 0])
    torch.bitwise_right_shift(word_bytes, 4, out=nibbles[..., 1])
    return nibbles.view(n_out, -1)


def sequential_group_size(g_idx: torch.Tensor, num_groups: int) -> int | None:
    """The group size when g_idx is k // group_size (no act-order permutation), else None. Reads g_idx on the
    host: for the CPU path, not for CUDA graphs."""
    k_in = g_idx.numel()
    group_size = -(-k_in // num_groups)
    if -(-k_in // group_size) != num_groups:
        return None
    expected = torch.arange(k_in, dtype=g_idx.dtype, device=g_idx.device) // group_size
    return group_size if torch.equal(g_idx, expected) else None


def dequantize_int_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W [N, K] contiguous: (q - zero) * scale in float32, then cast to `dtype` (default: scales' dtype).

    Where g_idx is sequential the per-group scale and zero broadcast over [N, G, group_size] instead of being
    gathered per element (3x faster on CPU); the values are the same."""
    k_in, n_out = check_int_weight(qweight, scales, zeros, g_idx, bits)
    weight = unpack_int_weight(qweight, bits).to(torch.float32)
    group_size = sequential_group_size(g_idx, scales.shape[0])
    if group_size is not None and k_in % group_size == 0:
        grouped = weight.view(n_out, -1, group_size)
        grouped.sub_(zeros.t().float().unsqueeze(-1)).mul_(scales.t().float().unsqueeze(-1))  # q - zero: exact
    else:  # act-order: [N, K] tables gathered with index_select (half the time of indexing with g_idx)
        groups = g_idx.long()
        weight.sub_(zeros.t().float().index_select(1, groups)).mul_(scales.t().float().index_select(1, groups))
    return weight.to(dtype or scales.dtype)


def int_quant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """The definition: W dequantised in float32 and rounded to x's dtype (the float checkpoint the quantised one
    stands for), the product accumulated in float32, the result in x's dtype. `group_size` is the kernels' hint
    that g_idx is k // group_size; the result does not depend on it."""
    k_in, _ = check_int_weight(qweight, scales, zeros, g_idx, bits)
    check_activations(x, k_in)
    weight = dequantize_int_weight(qweight, scales, zeros, g_idx, bits, dtype=x.dtype)
    return F.linear(x.float(), weight.float()).to(x.dtype)


def int_quant_matmul_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """CPU path: dequantise this layer's W per call, then the ordinary `linear(x, W)` in x's dtype, so a float32
    run equals transformers running the dequantised float weights bit for bit. The packed weights stay the only
    copy held; an int8 matmul would need quantised activations, which would break that equality."""
    k_in, _ = check_int_weight(qweight, scales, zeros, g_idx, bits)
    check_activations(x, k_in)
    return linear(x, dequantize_int_weight(qweight, scales, zeros, g_idx, bits, dtype=x.dtype))
