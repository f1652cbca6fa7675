"""Integer-quantised weights (4- and 8-bit, grouped scales and zero points, GPTQ act-order): dequantisation against a
loop over the layout's definition, the CPU path against F.linear on the dequantised weights, and the Triton kernels
(GEMV for decode batches, GEMM through tl.dot, split-K) against the reference, under TRITON_INTERPRET=1 without a
GPU (tests/conftest.py sets it) and compiled in the gpu tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rayinfer.kernels import quant_matmul as qm
from rayinfer.kernels import quant_matmul_triton as qt
from rayinfer.kernels.triton_compat import HAS_TRITON

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Bound on max |triton - reference| / max |reference|: both round W to x's dtype and sum in float32, in another
# order; the interpreter truncates float32 -> bfloat16 where GPUs round to nearest even.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")


def pack_int_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] unsigned values -> int32 [K // pack, N], row k in bits [bits * (k % pack), ...) of word k // pack."""
    pack = 32 // bits
    words = torch.zeros(q.shape[0] // pack, q.shape[1], dtype=torch.int64)
    for field in range(pack):
        words |= q[field::pack].long() << (bits * field)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_int_weight(
    k_in: int, n_out: int, bits: int, group_size: int, act_order: bool, scale_dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """(q [K, N], qweight, scales, zeros, g_idx); group_size -1 means one group over K."""
    gen = torch.Generator().manual_seed(seed)
    group_size = k_in if group_size == -1 else group_size
    num_groups = -(-k_in // group_size)
    q = torch.randint(0, 2**bits, (k_in, n_out), generator=gen)
    scales = (torch.rand(num_groups, n_out, generator=gen) + 0.5) / (2**bits * k_in**0.5)
    zeros = torch.randint(0, 2**bits, (num_groups, n_out), generator=gen).to(torch.uint8)
    g_idx = (torch.arange(k_in) // group_size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k_in, generator=gen)]
    return q, pack_int_weight(q, bits), scales.to(scale_dtype), zeros, g_idx


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output (a tile left unwritten?)"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} x max |reference| {scale:.3g}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True], ids=["sequential", "act_order"])
def test_dequantize_equals_the_layout_definition(bits: int, act_order: bool) -> None:
    q, qweight, scales, zeros, g_idx = make_int_weight(64, 8, bits, 16, act_order, torch.float16, seed=bits)
    expected = torch.empty(8, 64)
    for n in range(8):
        for k in range(64):
            word = int(qweight[k // (32 // bits), n]) & 0xFFFFFFFF
            value = (word >> (bits * (k % (32 // bits)))) & (2**bits - 1)
            assert value == int(q[k, n])
            group = int(g_idx[k])
            expected[n, k] = (value - int(zeros[group, n])) * float(scales[group, n])
    weight = qm.dequantize_int_weight(qweight, scales, zeros, g_idx, bits, dtype=torch.float32)
    assert weight.is_contiguous() and weight.shape == (8, 64)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert qm.dequantize_int_weight(qweight, scales, zeros, g_idx, bits).dtype == torch.float16


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "group_size,act_order", [(32, False), (48, False), (128, False), (-1, False), (32, True)], ids=str
)
def test_cpu_path_is_exactly_linear_on_the_dequantised_weight(bits: int, group_size: int, act_order: bool) -> None:
    q, qweight, scales, zeros, g_idx = make_int_weight(192, 40, bits, group_size, act_order, torch.float32, seed=3)
    x = torch.randn(5, 192)
    weight = qm.dequantize_int_weight(qweight, scales, zeros, g_idx, bits)
    expected = F.linear(x, weight.contiguous())
    assert torch.equal(qm.int_quant_matmul_cpu(x, qweight, scales, zeros, g_idx, bits), expected)
    assert torch.equal(qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, bits), expected)
    calls = []
    linear = lambda a, w: calls.append(w.shape) or F.linear(a, w)  # noqa: E731
    qm.int_quant_matmul_cpu(x, qweight, scales, zeros, g_idx, bits, linear=linear)
    assert calls == [(40, 192)]


def test_reference_rounds_the_weight_to_the_activation_dtype() -> None:
    _, qweight, scales, zeros, g_idx = make_int_weight(64, 32, 4, 32, False, torch.float32, seed=4)
    x = torch.randn(3, 64).bfloat16()
    weight = qm.dequantize_int_weight(qweight, scales, zeros, g_idx, 4, dtype=torch.bfloat16)
    expected = F.linear(x.float(), weight.float()).bfloat16()
    assert torch.equal(qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, 4), expected)
    assert_close_to(qm.int_quant_matmul_cpu(x, qweight, scales, zeros, g_idx, 4), expected, 1e-2)


# (M, K, N): M=1 and 3 take the GEMV kernel, 17 the tl.dot one; N=32 leaves one column tile, so K is split.
SHAPES = [(1, 128, 32), (3, 256, 96), (17, 64, 48)]
GROUPS = [(32, False, True), (64, False, False), (-1, False, True), (32, True, False)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,act_order,hint", GROUPS, ids=["g32-hint", "g64", "one-group-hint", "act-order"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(
    shape: tuple[int, int, int], group_size: int, act_order: bool, hint: bool, bits: int, dtype: torch.dtype
) -> None:
    m_rows, k_in, n_out = shape
    _, qweight, scales, zeros, g_idx = make_int_weight(k_in, n_out, bits, group_size, act_order, dtype, seed=sum(shape))
    x = torch.randn(m_rows, k_in, generator=torch.Generator().manual_seed(bits)).to(dtype)
    hinted = (k_in if group_size == -1 else group_size) if hint else None
    out = qt.int_quant_matmul_triton(x, qweight, scales, zeros, g_idx, bits, group_size=hinted)
    assert_close_to(out, qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, bits), TOL[dtype])


@needs_triton
@pytest.mark.parametrize("m_rows", [2, 20])
def test_split_k_and_one_program_per_tile_both_match_reference(monkeypatch: pytest.MonkeyPatch, m_rows: int) -> None:
    _, qweight, scales, zeros, g_idx = make_int_weight(256, 64, 4, 64, False, torch.float32, seed=7)
    x = torch.randn(m_rows, 256)
    ref = qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, 4)
    for programs in (1, 64):  # one program per output tile, then as many K splits as there are K tiles
        monkeypatch.setattr(qt, "_target_programs", lambda device, programs=programs: programs)
        block_k = qt.tile_config(m_rows, torch.float32, 64)[2]
        assert qt.split_k(256, block_k, 1, x.device)[0] == (1 if programs == 1 else 256 // block_k)
        out = qt.int_quant_matmul_triton(x, qweight, scales, zeros, g_idx, 4, group_size=64)
        assert_close_to(out, ref, TOL[torch.float32])


def test_split_k_fills_the_device_without_empty_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qt, "_target_programs", lambda device: 264)  # an H100's 132 SMs, two programs each
    cpu = torch.device("cpu")
    assert qt.split_k(4096, 128, 64, cpu) == (4, 1024)  # decode, N = 4096: 64 column tiles, 4 splits of K
    assert qt.split_k(4096, 64, 256, cpu) == (1, 4096)  # prefill: the tiles fill the device already
    assert qt.split_k(14336, 64, 1, cpu) == (16, 896)  # at most MAX_SPLIT_K
    assert qt.split_k(320, 64, 1, cpu) == (5, 64)  # no more splits than K tiles
    assert qt.split_k(448, 64, 40, cpu) == (4, 128)  # 7 tiles over 6 splits would leave one empty: 4 of 2 tiles


@needs_triton
@pytest.mark.parametrize("m_rows", [1, 17])
@pytest.mark.parametrize("group_size", [48, 128])
def test_groups_that_do_not_tile_k(group_size: int, m_rows: int) -> None:
    """48: the hint names groups no K tile fits, so scales are gathered; 128 over K = 192: the last group is short."""
    _, qweight, scales, zeros, g_idx = make_int_weight(192, 48, 4, group_size, False, torch.float16, seed=group_size)
    x = torch.randn(m_rows, 192).half()
    out = qt.int_quant_matmul_triton(x, qweight, scales, zeros, g_idx, 4, group_size=group_size)
    assert_close_to(out, qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, 4), TOL[torch.float16])


@needs_triton
def test_float32_scales_with_bfloat16_activations_and_strided_rows() -> None:
    _, qweight, scales, zeros, g_idx = make_int_weight(128, 64, 4, 32, False, torch.float32, seed=8)
    wide = torch.randn(6, 160).bfloat16()
    x = wide[:, 16:144]
    assert x.stride(0) == 160
    out = qt.int_quant_matmul_triton(x, qweight, scales, zeros, g_idx, 4, group_size=32)
    assert_close_to(out, qm.int_quant_matmul_reference(x, qweight, scales, zeros, g_idx, 4), TOL[torch.bfloat16])


@needs_triton
def test_empty_batch_and_bad_inputs() -> None:
    _, qweight, scales, zeros, g_idx = make_int_weight(64, 32, 4, 32, False, torch.float32, seed=9)
    assert qt.int_quant_matmul_triton(torch.randn(0, 64), qweight, scales, zeros, g_idx, 4).shape == (0, 32)
    with pytest.raises(ValueError, match="x"):
        qt.int_quant_matmul_triton(torch.randn(2, 63), qweight, scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="bits"):
        qm.int_quant_matmul_cpu(torch.randn(2, 64), qweight, scales, zeros, g_idx, 3)
    with pytest.raises(ValueError, match="zeros"):
        qm.int_quant_matmul_reference(torch.randn(2, 64), qweight, scales, zeros.int(), g_idx, 4)
    with pytest.raises(ValueError, match="group_size"):
        qt.int_quant_matmul_triton(torch.randn(2, 64), qweight, scales, zeros, g_idx, 4, group_size=16)


# Compiles the kernel for real (Triton's code generator and the ptxas its wheel bundles; no GPU needed) in variants
# the interpreter cannot vouch for: it runs the kernel as Python, so code the compiler rejects can pass there.
_COMPILE_SCRIPT = r"""
import sys
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from rayinfer.kernels.quant_matmul_triton import _quant_matmul_kernel as kernel

def build(arch, is_fp8, bits, as_bits, per_tile, act_quant, use_dot, blocks, warps):
    fp8 = "*u8" if as_bits else "*fp8e4nv"
    types = {"x_ptr": fp8 if act_quant else "*bf16", "x_scale_ptr": "*fp32", "w_ptr": fp8 if is_fp8 else "*i32",
             "scale_ptr": "*fp32" if is_fp8 else "*bf16", "zero_ptr": "*u8", "g_idx_ptr": "*i32", "out_ptr": "*fp32"}
    signature = {a: types.get(a, "constexpr" if a.isupper() else "i32") for a in kernel.arg_names}
    constants = dict(IS_FP8=is_fp8, BITS=bits, FP8_AS_BITS=as_bits, SCALE_PER_TILE=per_tile, ACT_QUANT=act_quant,
                     USE_DOT=use_dot, COMPUTE_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", DOT_UPCAST=False,
                     BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})

build(90, False, 4, False, True, False, False, (1, 64, 128), 4)  # W4A16 GEMV, one scale row per tile
build(90, False, 8, False, False, False, True, (64, 128, 64), 8)  # W8A16 GEMM, act-order scales
build(90, True, 8, False, False, True, True, (16, 64, 64), 4)  # FP8 W8A8 GEMM on fp8 loads, gathered blocks
build(80, True, 8, True, True, True, False, (4, 64, 32), 4)  # FP8 GEMV from bytes, on a GPU without fp8
print("compiled")
"""


@needs_triton
def test_kernel_compiles_for_hopper_and_ampere(tmp_path: Path) -> None:
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# (M, bits, dtype): each GEMV row count, the small and large GEMM tiles; few enough that compiling stays short.
CUDA_CASES = [(1, 4, torch.bfloat16), (1, 8, torch.float16), (4, 4, torch.float16), (8, 4, torch.bfloat16),
              (64, 8, torch.bfloat16), (300, 4, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("m_rows,bits,dtype", CUDA_CASES, ids=str)
def test_triton_on_cuda_matches_reference(m_rows: int, bits: int, dtype: torch.dtype) -> None:
    for group_size, act_order, hint in [(128, False, True), (128, True, False)]:
        _, qweight, scales, zeros, g_idx = make_int_weight(1024, 768, bits, group_size, act_order, dtype, seed=m_rows)
        tensors = [t.cuda() for t in (qweight, scales, zeros, g_idx)]
        x = torch.randn(m_rows, 1024, device="cuda").to(dtype)
        out = qt.int_quant_matmul_triton(x, *tensors, bits, group_size=group_size if hint else None)
        assert_close_to(out, qm.int_quant_matmul_reference(x, *tensors, bits), TOL[dtype])
