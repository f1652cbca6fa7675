"""Triton rotary embedding against its torch reference: in place on q/k views of a fused qkv buffer."""
from __future__ import annotations

import itertools
import os

# tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA device is present (before Triton loads).

import pytest  # noqa: E402
import torch  # noqa: E402

from rayinfer.kernels import rotary  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Norm-wise relative error bounds; the interpreter truncates float32 -> bfloat16 (GPUs round to nearest even).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2 if INTERPRETED else 1e-2}
MAX_POSITION = 64


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    out32, ref32 = out.float(), ref.float()
    rel = ((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[out.dtype], f"relative error {rel:.3g} > {REL_TOL[out.dtype]:.1g}"
    torch.testing.assert_close(out32, ref32, rtol=ELEM_TOL[out.dtype], atol=ELEM_TOL[out.dtype])


def rope_tables(rot_dim: int, gen: torch.Generator, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real cos/sin tables (as the model builds them) for positions 0..MAX_POSITION-1, float32 [N, rot_dim/2]."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.arange(MAX_POSITION, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = angles + torch.rand(angles.shape, generator=gen)  # no position is left unrotated
    return angles.cos(), angles.sin()


def fused_qkv(tokens: int, q_heads: int, k_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """A [T, (Hq + 2 Hk) * D] projection output, and its q/k as the model takes them: non-contiguous views."""
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim, generator=gen).to(dtype)

    def views(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = buffer.split([q_heads * head_dim, k_heads * head_dim, k_heads * head_dim], dim=-1)
        return q.reshape(tokens, q_heads, head_dim), k.reshape(tokens, k_heads, head_dim)

    return qkv, views


def _cases() -> list:
    """Every head dim with full, half and quarter rotary, both pair layouts; dtype, T and GQA shape rotate."""
    heads = [(4, 4), (6, 2), (8, 1), (5, 1)]
    cases = []
    combos = itertools.product([64, 80, 96, 128, 256], [1.0, 0.5, 0.25], [True, False])
    for i, (head_dim, fraction, is_neox) in enumerate(combos):
        dtype = DTYPES[i % 3]
        tokens = (1, 3, 17)[(i // 3) % 3]
        q_heads, k_heads = heads[i % 4]
        cases.append(
            pytest.param(
                tokens, q_heads, k_heads, head_dim, fraction, is_neox, dtype,
                id=f"T{tokens}-q{q_heads}k{k_heads}-D{head_dim}-rot{fraction}-{'neox' if is_neox else 'gptj'}-"
                f"{str(dtype).removeprefix('torch.')}",
            )
        )
    return cases


@pytest.mark.parametrize("tokens,q_heads,k_heads,head_dim,fraction,is_neox,dtype", _cases())
def test_rotary_matches_reference(
    tokens: int, q_heads: int, k_heads: int, head_dim: int, fraction: float, is_neox: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(head_dim * 10 + tokens + int(fraction * 8) + is_neox)
    rot_dim = int(head_dim * fraction)
    cos, sin = rope_tables(rot_dim, gen)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen)
    qkv, views = fused_qkv(tokens, q_heads, k_heads, head_dim, dtype, gen)
    expected = qkv.clone()
    rotary.rotary_embedding_reference(positions, *views(expected), cos, sin, is_neox)
    before = qkv.clone()

    q, k = views(qkv)
    assert not q.is_contiguous() or tokens == 1
    out_q, out_k = rotary.rotary_embedding_triton(positions, q, k, cos, sin, is_neox)

    assert out_q is q and out_k is k, "returns the tensors it rotated in place"
    assert_matches(qkv, expected)
    # Features past rot_dim, and the v slice, are not touched at all.
    q_before, k_before = views(before)
    assert torch.equal(q[..., rot_dim:], q_before[..., rot_dim:])
    assert torch.equal(k[..., rot_dim:], k_before[..., rot_dim:])
    v_start = (q_heads + k_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])


def test_other_layouts() -> None:
    """Head-major q (token stride < head stride), a feature stride of 2, int32 positions, sliced cos/sin."""
    gen = torch.Generator().manual_seed(3)
    tokens, q_heads, k_heads, head_dim = 5, 4, 2, 64
    wide_cos, wide_sin = rope_tables(2 * head_dim, gen)
    cos, sin = wide_cos[:, : head_dim // 2], wide_sin[:, : head_dim // 2]  # row stride != row length
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen, dtype=torch.int32)
    q = torch.randn(q_heads, tokens, head_dim, generator=gen).transpose(0, 1)
    k = torch.randn(tokens, k_heads, 2 * head_dim, generator=gen)[..., ::2]
    for is_neox in (True, False):
        q_ref, k_ref = q.clone(), k.clone()
        rotary.rotary_embedding_reference(positions.long(), q_ref, k_ref, cos, sin, is_neox)
        rotary.rotary_embedding_triton(positions, q, k, cos, sin, is_neox)
        assert_matches(q, q_ref)
        assert_matches(k, k_ref)


def test_no_tokens() -> None:
    cos, sin = rope_tables(64, torch.Generator().manual_seed(0))
    q, k = torch.empty(0, 4, 64), torch.empty(0, 2, 64)
    assert rotary.rotary_embedding_triton(torch.empty(0, dtype=torch.long), q, k, cos, sin) == (q, k)


def test_rot_dim_past_head_dim_is_refused() -> None:
    cos, sin = rope_tables(128, torch.Generator().manual_seed(0))
    positions, q, k = torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match="rot_dim"):
        rotary.rotary_embedding_triton(positions, q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sweep(dtype: torch.dtype) -> None:
    """Model-sized heads and batches on the device."""
    gen = torch.Generator().manual_seed(0)
    for tokens, (q_heads, k_heads), head_dim, fraction, is_neox in itertools.product(
        (1, 33, 4096), ((32, 8), (64, 8), (28, 4), (40, 40)), (64, 128, 256), (1.0, 0.5), (True, False)
    ):
        rot_dim = int(head_dim * fraction)
        cos, sin = (t.cuda() for t in rope_tables(rot_dim, gen))
        positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen).cuda()
        qkv, views = fused_qkv(tokens, q_heads, k_heads, head_dim, dtype, gen)
        qkv = qkv.cuda()
        expected = qkv.clone()
        rotary.rotary_embedding_reference(positions, *views(expected), cos, sin, is_neox)
        rotary.rotary_embedding_triton(positions, *views(qkv), cos, sin, is_neox)
        assert_matches(qkv, expected)
