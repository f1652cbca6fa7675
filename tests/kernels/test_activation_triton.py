"""Triton gated activations (SiLU and GELU, times the value half) against their torch references."""
from __future__ import annotations

import os

# tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA device is present (before Triton loads).

import pytest  # noqa: E402
import torch  # noqa: E402

from rayinfer.kernels import activation  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform"),
    # numpy's exp overflows to inf for very negative gates in the interpreter; sigmoid still comes out 0.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Norm-wise relative error bounds; the interpreter truncates float32 -> bfloat16 (GPUs round to nearest even).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-2 if INTERPRETED else 2e-2}
OPS = {
    "silu": (activation.silu_and_mul_triton, activation.silu_and_mul_reference),
    "gelu": (activation.gelu_and_mul_triton, activation.gelu_and_mul_reference),
    "gelu_tanh": (
        lambda x: activation.gelu_and_mul_triton(x, approximate="tanh"),
        lambda x: activation.gelu_and_mul_reference(x, approximate="tanh"),
    ),
}


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as NaN, so an element the kernel fails to write cannot pass for a correct one."""
    monkeypatch.setattr(activation, "NAN_FILL_OUTPUTS", True)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    out32, ref32 = out.float(), ref.float()
    rel = ((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[out.dtype], f"relative error {rel:.3g} > {REL_TOL[out.dtype]:.1g}"
    torch.testing.assert_close(out32, ref32, rtol=ELEM_TOL[out.dtype], atol=ELEM_TOL[out.dtype])


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (3, 80), (17, 200), (2, 3, 96), (2, 1500)], ids=str)
def test_gated_activation(op: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """(2, 1500) spans two column blocks with a ragged last one."""
    triton_op, reference = OPS[op]
    gen = torch.Generator().manual_seed(sum(shape) * 7 + len(op))
    x = (4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)).to(dtype)
    before = x.clone()
    assert_matches(triton_op(x), reference(x))
    assert torch.equal(x, before)


@pytest.mark.parametrize("op", list(OPS))
def test_extreme_gates(op: str) -> None:
    """Gates far into both tails (exp overflow territory) stay finite and match."""
    triton_op, reference = OPS[op]
    gate = torch.tensor([[-1e4, -200.0, -90.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 90.0, 200.0, 1e4]])
    x = torch.cat([gate, torch.full_like(gate, 0.5)], dim=-1)
    assert_matches(triton_op(x), reference(x))


def test_strided_rows() -> None:
    """A row-strided view (a slice of a wider buffer) is read in place."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2 * 96 + 32, generator=gen, dtype=torch.float16)[:, : 2 * 96]
    for triton_op, reference in OPS.values():
        assert_matches(triton_op(x), reference(x))


def test_no_tokens_and_bad_widths() -> None:
    assert activation.silu_and_mul_triton(torch.empty(0, 128)).shape == (0, 64)
    with pytest.raises(ValueError, match="even"):
        activation.silu_and_mul_triton(torch.randn(2, 7))
    with pytest.raises(ValueError, match="approximate"):
        activation.gelu_and_mul_triton(torch.randn(2, 8), approximate="erf")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sweep(dtype: torch.dtype) -> None:
    """Model-sized MLP widths on the device."""
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 7, 4096):
        for d in (1376, 2880, 11008, 14336, 18944):
            x = (4 * torch.randn(tokens, 2 * d, generator=gen)).to(dtype).cuda()
            for triton_op, reference in OPS.values():
                assert_matches(triton_op(x), reference(x))
