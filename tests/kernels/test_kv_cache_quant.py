"""Writing a quantised KV cache: the rules of kv_quant (scales, rounding, saturation) and the Triton write kernel
against its torch reference, code for code, for fp8 (e4m3) and int8 pools, dynamic and static scales.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py and below)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rayinfer.kernels import kv_cache_write  # noqa: E402
from rayinfer.kernels.kv_cache_write import write_kv_reference, write_kv_triton  # noqa: E402
from rayinfer.kernels.kv_quant import FP8_DTYPE, QUANT_MAX, dequantize, dynamic_scales, quantize  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CODE_DTYPES = [FP8_DTYPE, torch.int8]
triton_only = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and type(kv_cache_write._write_kv_kernel).__name__ != "InterpretedFunction"),
    reason="no Triton, or no CUDA and the kernels were imported before TRITON_INTERPRET=1 was set",
)


def _bits(codes: torch.Tensor) -> torch.Tensor:
    """Codes as comparable integers (float8 has no equality that tells -0 from 0 or compares NaN)."""
    return codes.view(torch.uint8) if codes.dtype == FP8_DTYPE else codes


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=["fp8", "int8"])
def test_dynamic_scale_maps_each_head_amax_to_the_largest_code(dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    scales = dynamic_scales(x, dtype)
    torch.testing.assert_close(scales, x.abs().amax(-1) / QUANT_MAX[dtype], rtol=1e-6, atol=0)
    codes = quantize(x, scales, dtype)
    assert torch.equal(codes.float().abs().amax(-1), torch.full((5, 3), QUANT_MAX[dtype]))
    # Round to nearest: within half a grid step (e4m3 has 3 mantissa bits: a relative half-step of 1/16).
    error = (dequantize(codes, scales, torch.float32) - x).abs()
    bound = x.abs() / 16 + scales[..., None] * 2.0**-10 if dtype == FP8_DTYPE else scales[..., None] / 2
    assert bool((error <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=["fp8", "int8"])
def test_a_zero_vector_stays_zero_and_a_static_scale_saturates(dtype: torch.dtype) -> None:
    x = torch.zeros(2, 1, 8)
    codes = quantize(x, dynamic_scales(x, dtype), dtype)
    assert torch.equal(codes.float(), x)  # no 0 / 0
    big = torch.tensor([[[1000.0, -1000.0, 1.0]]])
    saturated = quantize(big, torch.tensor([[1.0]]), dtype).float()
    qmax = QUANT_MAX[dtype]
    assert saturated.tolist() == [[[qmax, -qmax, 1.0]]]


def _write_both(key, value, num_blocks, block_size, dtype, slots, k_scale=None, v_scale=None):
    """Runs the reference and the kernel on NaN-scaled pools; returns their (k, v, k_scales, v_scales) each."""
    kv_heads, head_dim = key.shape[1:]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    results = []
    for write in (write_kv_reference, write_kv_triton):
        pools = [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(2)]
        pools += [torch.full(shape[:3], float("nan"), device=DEVICE) for _ in range(2)]
        write(key, value, pools[0], pools[1], slots, pools[2], pools[3], k_scale=k_scale, v_scale=v_scale)
        results.append(pools)
    return results


@pytest.mark.parametrize("static", [None, "layer", "head"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=["fp8", "int8"])
@triton_only
def test_triton_write_equals_reference_code_for_code(dtype, model_dtype, static) -> None:
    num_blocks, block_size, kv_heads, head_dim = 5, 4, 2, 80
    gen = torch.Generator().manual_seed(1)
    # key/value as the layer passes them: strided views into one fused qkv projection output.
    qkv = (torch.randn(6, (4 + 2 * kv_heads) * head_dim, generator=gen) * 3).to(model_dtype).to(DEVICE)
    key = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    value = qkv[:, (4 + kv_heads) * head_dim :].view(6, kv_heads, head_dim)
    key[2, 1] = 0.0  # an all-zero head row
    scale = {None: None, "layer": torch.tensor(0.02), "head": torch.tensor([0.05, 0.01])}[static]
    scale = None if scale is None else scale.to(DEVICE)
    slots = torch.tensor([7, -1, 0, 19, -1, 12], device=DEVICE)
    expected, got = _write_both(key, value, num_blocks, block_size, dtype, slots, scale, scale)
    for want, have in zip(expected[:2], got[:2]):
        assert torch.equal(_bits(have), _bits(want))
    for want, have in zip(expected[2:], got[2:]):
        torch.testing.assert_close(have, want, rtol=0, atol=0, equal_nan=True)
        assert int(torch.isnan(have).sum()) == (num_blocks * block_size - 4) * kv_heads  # padding wrote nothing
    if scale is not None:  # the static scale is what each written row reads back with
        written = got[2].view(-1, kv_heads)[slots[slots >= 0]]
        assert torch.equal(written, scale.float().expand(kv_heads).expand_as(written))


def _grid_neighbourhood(dtype: torch.dtype) -> torch.Tensor:
    """Every code's value, the midpoints between neighbours (ties), and the floats just either side of them."""
    if dtype == FP8_DTYPE:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
        values = values[~torch.isnan(values)].unique()
    else:
        values = torch.arange(-127, 128).float()
    mids = (values[1:] + values[:-1]) / 2
    around = [torch.nextafter(mids, torch.tensor(sign * float("inf"))) for sign in (-1, 1)]
    return torch.cat([values, mids, *around, torch.tensor([500.0, -500.0, 127.9, -127.9])])


@triton_only
@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=["fp8", "int8"])
def test_triton_rounds_every_tie_and_near_tie_as_torch(dtype: torch.dtype) -> None:
    """Scale 1, so the codes are the values rounded: ties go to even, and nothing is left to the interpreter's
    float8 cast, which rounds some values under a power of two to half of it."""
    values = _grid_neighbourhood(dtype)
    head_dim = 32
    rows = -(-values.numel() // head_dim)
    padded = torch.cat([values, torch.zeros(rows * head_dim - values.numel())])
    key = padded.view(rows, 1, head_dim).to(DEVICE)
    slots = torch.arange(rows, device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    expected, got = _write_both(key, key, rows, 1, dtype, slots, one, one)
    assert torch.equal(_bits(got[0]), _bits(expected[0]))
    assert torch.equal(_bits(got[1]), _bits(expected[1]))


def test_scales_must_match_the_pool() -> None:
    key = torch.randn(2, 2, 8)
    k_cache = torch.zeros(3, 4, 2, 8, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="needs float32 k_scales of shape"):
        write_kv_reference(key, key, k_cache, k_cache.clone(), torch.tensor([0, 1]))
    float_cache = torch.zeros(3, 4, 2, 8)
    with pytest.raises(ValueError, match="not quantised"):
        write_kv_reference(key, key, float_cache, float_cache.clone(), torch.tensor([0, 1]), torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="1 or 2"):
        scales = torch.zeros(3, 4, 2)
        write_kv_reference(key, key, k_cache, k_cache.clone(), torch.tensor([0, 1]), scales, scales.clone(),
                           k_scale=torch.ones(3))
