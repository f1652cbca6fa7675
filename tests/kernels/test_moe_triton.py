"""The fused mixture-of-experts op: its torch reference against a per-token definition, and the Triton grouped GEMM
against the reference (under TRITON_INTERPRET=1 without a GPU; on CUDA in the gpu test)."""
from __future__ import annotations

import os

# tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA device is present (before Triton loads).

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rayinfer.kernels import moe  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Norm-wise relative error bounds: the Triton version rounds the same intermediates but sums in another order. The
# interpreter truncates float32 -> bfloat16 (GPUs round to nearest even): its four roundings per row (gate, SiLU,
# up, down) drift one way, about 1.8% from the exact result where the reference is within 0.5%.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2 if INTERPRETED else 1e-2}
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 6e-2 if INTERPRETED else 3e-2}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as NaN, so a row the kernel fails to write cannot pass for a correct one."""
    monkeypatch.setattr(moe, "NAN_FILL_OUTPUTS", True)


def make_inputs(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    probs = torch.softmax(2 * torch.randn(tokens, experts, generator=gen), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    tensors = (x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), weights, ids)
    return tuple(t.to(device) for t in tensors)


def per_token_definition(x, w_gate_up, w_down, weights, ids) -> torch.Tensor:
    """The op written out token by token in float64: what both versions must compute."""
    x, w_gate_up, w_down, weights = (t.double() for t in (x, w_gate_up, w_down, weights))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, k] * (w_down[e] @ (F.silu(gate) * up))
    return out


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output (a row left unwritten?)"
    out32, ref32 = out.float(), ref.float()
    rel = ((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[out.dtype], f"relative error {rel:.3g} > {REL_TOL[out.dtype]:.1g}"
    torch.testing.assert_close(out32, ref32, rtol=ELEM_TOL[out.dtype], atol=ELEM_TOL[out.dtype])


# (tokens, experts, top_k, hidden, intermediate): ragged sizes (not multiples of the tiles), more experts than
# assignments (some get none), top-1 and top-3, and > 64 assignments (the larger M tile, several blocks per expert).
SHAPES = [(1, 4, 2, 64, 32), (3, 8, 2, 48, 40), (7, 4, 1, 64, 24), (10, 6, 3, 80, 72), (45, 4, 2, 64, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_equals_the_per_token_definition(shape: tuple[int, ...]) -> None:
    inputs = make_inputs(*shape, dtype=torch.float32, seed=sum(shape))
    expected = per_token_definition(*inputs)
    torch.testing.assert_close(moe.fused_moe_reference(*inputs).double(), expected, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    inputs = make_inputs(*shape, dtype=dtype, seed=sum(shape) + 1)
    before = [t.clone() for t in inputs]
    assert_matches(moe.fused_moe_triton(*inputs), moe.fused_moe_reference(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "an input was modified"


@needs_triton
def test_triton_takes_routing_weights_in_the_activation_dtype_and_strided_rows() -> None:
    """Qwen2-MoE passes its weights cast to the activations' dtype; x may be a row-strided view."""
    x, w_gate_up, w_down, weights, ids = make_inputs(6, 4, 2, 64, 32, dtype=torch.float16, seed=5)
    wide = torch.cat([x, torch.ones_like(x[:, :16])], dim=1)[:, :64]
    assert wide.stride(0) != 64
    weights = weights.half()
    assert_matches(
        moe.fused_moe_triton(wide, w_gate_up, w_down, weights, ids),
        moe.fused_moe_reference(wide, w_gate_up, w_down, weights, ids),
    )


def test_expert_block_layout_groups_assignments_by_expert() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 gets nothing
    sorted_ids, block_expert = moe.expert_block_layout(ids, num_experts=4, block_m=2)
    pad = ids.numel()
    blocks = sorted_ids.view(-1, 2).tolist()
    real = [(expert, rows) for expert, rows in zip(block_expert.tolist(), blocks) if expert >= 0]
    # Stable order inside an expert (token-major), each expert's run padded to whole blocks.
    assert real == [(0, [1, 4]), (2, [0, 2]), (2, [5, pad]), (3, [3, pad])]
    assert all(rows == [pad, pad] for expert, rows in zip(block_expert.tolist(), blocks) if expert < 0)


@needs_triton
def test_no_tokens_and_bad_shapes() -> None:
    x, w_gate_up, w_down, weights, ids = make_inputs(0, 4, 2, 64, 32, dtype=torch.float32, seed=0)
    assert moe.fused_moe_triton(x, w_gate_up, w_down, weights, ids).shape == (0, 64)
    x, w_gate_up, w_down, weights, ids = make_inputs(2, 4, 2, 64, 32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="w_down"):
        moe.fused_moe_triton(x, w_gate_up, w_down[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="does not fit w_gate_up"):
        moe.fused_moe_reference(x[:, :32], w_gate_up, w_down, weights, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype: torch.dtype) -> None:
    """Model-sized experts on the device: Mixtral-like (8 experts, top-2) and Qwen2-MoE-like (60, top-4)."""
    shapes = [(1, 8, 2, 4096, 1792), (300, 8, 2, 1024, 3584), (77, 60, 4, 2048, 1408)]
    for tokens, experts, top_k, hidden, inter in shapes:
        inputs = make_inputs(tokens, experts, top_k, hidden, inter, dtype=dtype, seed=tokens, device="cuda")
        assert_matches(moe.fused_moe_triton(*inputs), moe.fused_moe_reference(*inputs))
