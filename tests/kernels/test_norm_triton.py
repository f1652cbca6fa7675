"""Triton RMSNorm / fused add + RMSNorm / LayerNorm against their torch references."""
from __future__ import annotations

import os

# tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA device is present (before Triton loads).

import pytest  # noqa: E402
import torch  # noqa: E402

from rayinfer.kernels import norm  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Norm-wise relative error bounds. The interpreter rounds float32 -> bfloat16 by truncation (GPUs round to
# nearest even), which roughly doubles the bfloat16 error there.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}
# Element-wise bounds: a few units in the last place of the output dtype.
ELEM_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2 if INTERPRETED else 2e-2}
SHAPES = [(1, 64), (3, 80), (17, 200), (3, 96), (2, 8192)]


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as NaN, so an element the kernel fails to write cannot pass for a correct one."""
    monkeypatch.setattr(norm, "NAN_FILL_OUTPUTS", True)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, precision: torch.dtype | None = None) -> None:
    """Finite, and within the error bounds of `precision` (the output dtype unless an input was narrower)."""
    precision = precision or out.dtype
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    assert torch.isfinite(ref).all()
    tol = REL_TOL[precision]
    out32, ref32 = out.float(), ref.float()
    rel = ((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
    assert rel <= tol, f"relative error {rel:.3g} > {tol:.1g}"
    elem = ELEM_TOL[precision]
    torch.testing.assert_close(out32, ref32, rtol=elem, atol=elem)


def _inputs(tokens: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).mul(3).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype)
    bias = torch.randn(hidden, generator=gen).to(dtype)
    return x, residual, weight, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, _, weight, _ = _inputs(tokens, hidden, dtype, seed=tokens * 1000 + hidden)
    x_before = x.clone()
    assert_matches(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_fused_add_rms_norm(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, residual, weight, _ = _inputs(tokens, hidden, dtype, seed=tokens * 1000 + hidden + 1)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_out, ref_residual = norm.fused_add_rms_norm_reference(x_before, residual_before, weight, 1e-5)
    assert_matches(out, ref_out)
    assert_matches(new_residual, ref_residual)
    if dtype != torch.bfloat16 or not INTERPRETED:  # one rounding of one add: bit-exact off the interpreter
        assert torch.equal(new_residual, ref_residual)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs must be left unchanged"


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_layer_norm(tokens: int, hidden: int, dtype: torch.dtype, with_bias: bool) -> None:
    x, _, weight, bias = _inputs(tokens, hidden, dtype, seed=tokens * 1000 + hidden + 2)
    x = x + 2.0  # a non-zero mean, so the centring matters
    bias = bias if with_bias else None
    assert_matches(norm.layer_norm_triton(x, weight, bias, 1e-5), norm.layer_norm_reference(x, weight, bias, 1e-5))


def test_leading_dims_and_strided_rows() -> None:
    """[B, S, H] inputs are flattened; a row-strided view (a slice of a wider buffer) is read in place."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(2, 3, 256, generator=gen, dtype=torch.float16)
    x = wide[..., :200]
    residual = torch.randn(2, 3, 200, generator=gen, dtype=torch.float16)
    weight = torch.randn(200, generator=gen, dtype=torch.float16)
    assert_matches(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))
    out, new_residual = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_residual = norm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert_matches(out, ref_out)
    assert torch.equal(new_residual, ref_residual)
    assert_matches(norm.layer_norm_triton(x, weight, weight, 1e-5), norm.layer_norm_reference(x, weight, weight, 1e-5))


def test_mixed_dtypes_promote_like_the_reference() -> None:
    """A float32 weight on bfloat16 activations gives a float32 result, as `weight * x` does in torch."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    residual = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    weight = torch.randn(96, generator=gen)
    bf16 = torch.bfloat16
    assert_matches(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6), bf16)
    out, new_residual = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_residual = norm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert_matches(out, ref_out, bf16)
    assert_matches(new_residual, ref_residual)
    assert_matches(norm.layer_norm_triton(x, weight, None, 1e-5), norm.layer_norm_reference(x, weight, None, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_longer_than_one_block(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The chunked path (rows over the register limit) on a small row: 200 features in blocks of 64."""
    monkeypatch.setattr(norm, "_MAX_FUSED_BLOCK", 64)
    x, residual, weight, bias = _inputs(3, 200, dtype, seed=5)
    x = x + 1.0
    assert_matches(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))
    out, new_residual = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_residual = norm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert_matches(out, ref_out)
    assert_matches(new_residual, ref_residual)
    assert_matches(norm.layer_norm_triton(x, weight, bias, 1e-5), norm.layer_norm_reference(x, weight, bias, 1e-5))


def test_no_tokens() -> None:
    x = torch.empty(0, 64)
    weight = torch.ones(64)
    assert norm.rms_norm_triton(x, weight, 1e-6).shape == (0, 64)
    out, new_residual = norm.fused_add_rms_norm_triton(x, x.clone(), weight, 1e-6)
    assert out.shape == new_residual.shape == (0, 64)
    assert norm.layer_norm_triton(x, weight, None, 1e-5).shape == (0, 64)


def test_weight_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm_triton(torch.randn(2, 64), torch.ones(32), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sweep(dtype: torch.dtype) -> None:
    """Model-sized rows on the device, including rows past the register limit (12288, 16384)."""
    for tokens in (1, 7, 257, 4096):
        for hidden in (1024, 2880, 4096, 5120, 8192, 12288, 16384):
            x, residual, weight, bias = (t.cuda() for t in _inputs(tokens, hidden, dtype, seed=tokens + hidden))
            assert_matches(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))
            out, new_residual = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-6)
            ref_out, ref_residual = norm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)
            assert_matches(out, ref_out)
            assert torch.equal(new_residual, ref_residual)
            assert_matches(
                norm.layer_norm_triton(x, weight, bias, 1e-5), norm.layer_norm_reference(x, weight, bias, 1e-5)
            )
