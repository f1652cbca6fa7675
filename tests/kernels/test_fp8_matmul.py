"""FP8 e4m3 weights (per-tensor, per-channel, block-wise scales), W8A16 and W8A8 with per-token activation scales: the
reference against the dequantised math, the CPU path against F.linear, the Triton kernel (fp8 loads and the byte
decoding used where Triton has no fp8) against the reference, and torch._scaled_mm's row-wise path."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from rayinfer.kernels import fp8_matmul as fm
from rayinfer.kernels.triton_compat import HAS_TRITON

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Bound on max |out - reference| / max |reference| (see test_quant_matmul.py).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}
# (name, block_size): per-tensor and per-channel scales, then blocks that do not divide N or K: (32, 48) straddles
# the kernel's K tiles (scales gathered per element), (16, 32) is one scale row per tile.
SCALES = [("tensor", None), ("channel", None), ("block32x48", (32, 48)), ("block16x32", (16, 32))]
# Plus blocks that tile the 40 x 72 and 48 x 80 weights of the dequantisation tests exactly (a broadcast, not gathers).
DEQUANT_SCALES = SCALES + [("block8x8", (8, 8))]

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")


def make_fp8_weight(
    n_out: int, k_in: int, kind: str, block_size: tuple[int, int] | None, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_out, k_in, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    if kind == "tensor":
        scale = torch.tensor(0.01)
    elif kind == "channel":
        scale = torch.rand(n_out, generator=gen) * 0.02 + 0.001
    else:
        bn, bk = block_size
        scale = torch.rand(-(-n_out // bn), -(-k_in // bk), generator=gen) * 0.02 + 0.001
    return weight.to(device), (scale / k_in**0.5).to(device)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output (a tile left unwritten?)"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} x max |reference| {scale:.3g}"


@pytest.mark.parametrize("kind,block_size", DEQUANT_SCALES, ids=[s[0] for s in DEQUANT_SCALES])
def test_dequantize_equals_the_scale_definition(kind: str, block_size: tuple[int, int] | None) -> None:
    weight, scale = make_fp8_weight(40, 72, kind, block_size, seed=1)
    expected = torch.empty(40, 72)
    for n in range(40):
        for k in range(72):
            if kind == "tensor":
                s = scale
            elif kind == "channel":
                s = scale[n]
            else:
                s = scale[n // block_size[0], k // block_size[1]]
            expected[n, k] = float(weight[n, k].float()) * float(s)
    torch.testing.assert_close(fm.dequantize_fp8_weight(weight, scale, block_size), expected, rtol=0, atol=0)


def test_per_token_activation_quantisation() -> None:
    x = torch.randn(4, 96) * torch.tensor([1.0, 30.0, 1e-3, 0.0])[:, None]
    x_q, x_scale = fm.quantize_activations_per_token(x)
    assert x_q.dtype == torch.float8_e4m3fn and x_scale.dtype == torch.float32 and x_scale.shape == (4,)
    torch.testing.assert_close(x_scale[:3], x[:3].abs().amax(dim=1) / 448)
    assert x_scale[3] == fm.MIN_ACT_SCALE and not x_q[3].float().any()  # a zero row: no division by zero
    assert torch.equal(x_q[:3].float().abs().amax(dim=1), torch.full((3,), 448.0))  # each row's largest maps to 448
    dequantised = x_q.float() * x_scale[:, None]
    assert ((dequantised - x).abs() <= x.abs() * 2**-4 + x_scale[:, None] * 2**-9).all()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("kind,block_size", DEQUANT_SCALES, ids=[s[0] for s in DEQUANT_SCALES])
def test_reference_and_cpu_path_are_the_dequantised_math(
    kind: str, block_size: tuple[int, int] | None, act_quant: bool
) -> None:
    weight, scale = make_fp8_weight(48, 80, kind, block_size, seed=2)
    x = torch.randn(5, 80)
    w = fm.dequantize_fp8_weight(weight, scale, block_size)
    # The CPU path is W8A16 whatever act_quant says: bit for bit F.linear on the dequantised weight.
    assert torch.equal(fm.fp8_matmul_cpu(x, weight, scale, block_size, act_quant), F.linear(x, w))
    if act_quant:
        x_q, x_scale = fm.quantize_activations_per_token(x)
        expected = F.linear(x_q.float() * x_scale[:, None], w)
    else:
        expected = F.linear(x, w)
    assert torch.equal(fm.fp8_matmul_reference(x, weight, scale, block_size, act_quant), expected)


@needs_triton
@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("kind,block_size", SCALES, ids=[s[0] for s in SCALES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m_rows", [1, 3, 17])
def test_triton_matches_reference(
    m_rows: int, dtype: torch.dtype, kind: str, block_size: tuple[int, int] | None, act_quant: bool
) -> None:
    weight, scale = make_fp8_weight(72, 160, kind, block_size, seed=m_rows)
    x = torch.randn(m_rows, 160, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = fm.fp8_matmul_triton(x, weight, scale, block_size, act_quant)
    assert_close_to(out, fm.fp8_matmul_reference(x, weight, scale, block_size, act_quant), TOL[dtype])


@needs_triton
@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("kind,block_size", SCALES[1:3], ids=["channel", "block32x48"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m_rows", [1, 17])
def test_byte_decoding_kernel_matches_reference(
    monkeypatch: pytest.MonkeyPatch, m_rows: int, dtype: torch.dtype, kind: str, block_size, act_quant: bool
) -> None:
    """The path for GPUs without fp8 in Triton (compute capability < 8.9): e4m3 decoded from uint8 arithmetically."""
    monkeypatch.setattr(fm, "FORCE_FP8_AS_BITS", True)
    weight, scale = make_fp8_weight(56, 96, kind, block_size, seed=6)
    x = torch.randn(m_rows, 96).to(dtype)
    out = fm.fp8_matmul_triton(x, weight, scale, block_size, act_quant)
    assert_close_to(out, fm.fp8_matmul_reference(x, weight, scale, block_size, act_quant), TOL[dtype])


@needs_triton
def test_byte_decoding_is_exact_for_every_finite_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "FORCE_FP8_AS_BITS", True)
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes
    weight = codes.view(torch.float8_e4m3fn).view(16, 16)
    identity = torch.eye(16)  # y = W.T's rows: every code passes through the decoder once, times 1.0
    out = fm.fp8_matmul_triton(identity, weight, torch.ones(16), None, False)
    assert torch.equal(out, weight.float().t())


def test_scaled_mm_rowwise_matches_reference() -> None:
    """torch._scaled_mm's row-wise call as the CUDA path makes it (CPU builds of torch have it too)."""
    if not fm._rowwise_scaled_mm_works(torch.device("cpu")):
        pytest.skip("this torch build has no row-wise _scaled_mm on CPU")
    for kind in ("tensor", "channel"):
        weight, scale = make_fp8_weight(48, 64, kind, None, seed=7)
        x = torch.randn(5, 64).bfloat16()
        out = fm.fp8_scaled_mm_rowwise(x, weight, scale)
        assert_close_to(out, fm.fp8_matmul_reference(x, weight, scale, None, True), 1e-2)


def test_scaled_mm_is_chosen_only_where_it_applies() -> None:
    weight, _ = make_fp8_weight(48, 64, "channel", None, seed=8)
    x = torch.randn(2, 64)
    assert not fm.can_use_scaled_mm(x, weight, None)  # float32 activations: no row-wise float32 output
    assert not fm.can_use_scaled_mm(x.bfloat16(), weight, (16, 16))  # block-wise scales
    assert not fm.can_use_scaled_mm(x[:, :40].bfloat16(), weight[:, :40], None)  # K not a multiple of 16


@needs_triton
def test_bad_inputs() -> None:
    weight, scale = make_fp8_weight(32, 64, "channel", None, seed=9)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fm.fp8_matmul_triton(torch.randn(2, 64), weight.float(), scale)
    with pytest.raises(ValueError, match="block-wise"):
        fm.fp8_matmul_reference(torch.randn(2, 64), weight, torch.ones(2, 3), (16, 32))
    with pytest.raises(ValueError, match="per-channel"):
        fm.fp8_matmul_cpu(torch.randn(2, 64), weight, torch.ones(7))
    assert fm.fp8_matmul_triton(torch.randn(0, 64), weight, scale).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("m_rows", [1, 8, 300])
def test_cuda_paths_match_reference(m_rows: int) -> None:
    """Compiled: the Triton kernel for block-wise scales (fp8 loads and byte decoding), _scaled_mm for W8A8."""
    x = torch.randn(m_rows, 1024, device="cuda").bfloat16()
    weight, scale = make_fp8_weight(768, 1024, "block", (128, 128), seed=m_rows, device="cuda")
    for act_quant in (False, True):
        ref = fm.fp8_matmul_reference(x, weight, scale, (128, 128), act_quant)
        assert_close_to(fm.fp8_matmul_cuda(x, weight, scale, (128, 128), act_quant), ref, 1e-2)
    fm.FORCE_FP8_AS_BITS = True
    try:
        ref = fm.fp8_matmul_reference(x, weight, scale, (128, 128))
        assert_close_to(fm.fp8_matmul_triton(x, weight, scale, (128, 128)), ref, 1e-2)
    finally:
        fm.FORCE_FP8_AS_BITS = False
    weight, scale = make_fp8_weight(768, 1024, "channel", None, seed=m_rows, device="cuda")
    for act_quant in (False, True):
        ref = fm.fp8_matmul_reference(x, weight, scale, None, act_quant)
        assert_close_to(fm.fp8_matmul_cuda(x, weight, scale, None, act_quant), ref, 1e-2)
        assert_close_to(fm.fp8_matmul_triton(x, weight, scale, None, act_quant), ref, 1e-2)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert fm.can_use_scaled_mm(x, weight, None)
