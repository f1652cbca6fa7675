"""Paged attention over a quantised (fp8 e4m3 / int8) KV pool: the torch reference reads the codes exactly as the
dequantised float pool, and the Triton kernel (plain and split-KV) and the native CPU decode kernel equal it.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py and
below)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

from rayinfer.kernels import attention_triton, cpu_attention  # noqa: E402
from rayinfer.kernels.attention_reference import paged_attention_reference  # noqa: E402
from rayinfer.kernels.cpu_attention import native_decode_available, paged_attention_cpu  # noqa: E402
from rayinfer.kernels.kv_quant import FP8_DTYPE, dequantize, dynamic_scales, quantize  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CODES = {"fp8": FP8_DTYPE, "int8": torch.int8}
# bfloat16 a little looser than for float pools: these K/V are twice as large, and so are bfloat16's steps.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def _quantized_step(shapes, num_heads, num_kv_heads, head_dim, block_size, code_dtype, q_dtype, seed, device="cpu",
                    float_pools=None):
    """A random mixed step over a quantised pool: shapes are (context already in the pool, new tokens). The scales
    of every slot no sequence owns are NaN, so a kernel that reads one (codes * NaN) poisons its output.
    float_pools: a list that receives the float K and V pools the codes were made from."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(c + n) // block_size) for c, n in shapes]
    num_blocks = sum(blocks_needed) + 2
    free = list(range(num_blocks))
    rng.shuffle(free)
    pad_block = free.pop()  # block tables are padded with it
    values = torch.randn(num_blocks * block_size, 2, num_kv_heads, head_dim, generator=gen) * 2
    scales = dynamic_scales(values.flatten(1, 2), code_dtype).view(-1, 2, num_kv_heads)
    codes = quantize(values.flatten(1, 2), scales.flatten(1), code_dtype).view(values.shape)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    tables, starts, lens = [], [0], []
    for (context, new), needed in zip(shapes, blocks_needed):
        table = [free.pop() for _ in range(needed)]
        for p in range(context + new):
            owned[table[p // block_size] * block_size + p % block_size] = True
        tables.append(table)
        starts.append(starts[-1] + new)
        lens.append(context + new)
    scales[~owned] = float("nan")
    pool = (num_blocks, block_size, num_kv_heads)
    if float_pools is not None:
        float_pools += [values[:, i].reshape(*pool, head_dim) for i in (0, 1)]
    width = max(len(t) for t in tables) + 1
    return {
        "q": torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(q_dtype).to(device),
        "k_cache": codes[:, 0].reshape(*pool, head_dim).contiguous().to(device),
        "v_cache": codes[:, 1].reshape(*pool, head_dim).contiguous().to(device),
        "block_tables": torch.tensor([t + [pad_block] * (width - len(t)) for t in tables], device=device),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=device),
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device),
        "k_scales": scales[:, 0].reshape(pool).contiguous().to(device),
        "v_scales": scales[:, 1].reshape(pool).contiguous().to(device),
    }


def _reference(step, scale, window=None, **scoring):
    """The reference on the step with the NaN scales of unowned slots zeroed (it reads whole blocks)."""
    cleaned = dict(step, k_scales=step["k_scales"].nan_to_num(0.0), v_scales=step["v_scales"].nan_to_num(0.0))
    return paged_attention_reference(**cleaned, scale=scale, sliding_window=window, **scoring)


def _shapes(block_size):
    """Decodes, a one-token prompt, a whole prompt, later chunks, chunks on block edges."""
    return [(7, 1), (0, 1), (block_size - 1, 1), (0, 9), (5, 3), (block_size, block_size), (2 * block_size - 2, 2)]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("codes", list(CODES))
def test_reference_reads_codes_as_the_dequantised_float_pool(codes: str, q_dtype: torch.dtype) -> None:
    step = _quantized_step(_shapes(4), 4, 2, 32, 4, CODES[codes], q_dtype, seed=1)
    scales = {name: step[name].nan_to_num(0.0) for name in ("k_scales", "v_scales")}
    float_pool = dict(
        step,
        k_cache=dequantize(step["k_cache"], scales["k_scales"], q_dtype),
        v_cache=dequantize(step["v_cache"], scales["v_scales"], q_dtype),
        k_scales=None,
        v_scales=None,
    )
    for window, alibi in ((None, None), (5, torch.tensor([0.5, 0.25, 0.125, 0.0625]))):
        expected = paged_attention_reference(**float_pool, scale=0.2, sliding_window=window, alibi_slopes=alibi)
        assert torch.equal(_reference(step, 0.2, window, alibi_slopes=alibi), expected)


@pytest.mark.parametrize("codes", list(CODES))
def test_quantised_attention_stays_close_to_float_attention(codes: str) -> None:
    """The codes' rounding reaches the output as a small perturbation only: a guard on the scale rule itself (a
    scale applied to the wrong row or head, or a wrong QMAX, would be far off)."""
    floats: list[torch.Tensor] = []
    step = _quantized_step(_shapes(4), 4, 2, 64, 4, CODES[codes], torch.float32, seed=2, float_pools=floats)
    exact = dict(step, k_cache=floats[0], v_cache=floats[1], k_scales=None, v_scales=None)
    error = (_reference(step, 64**-0.5) - paged_attention_reference(**exact, scale=64**-0.5)).abs().mean()
    # Measured over seeds: about 0.037 (fp8) and 0.010 (int8) of outputs averaging 1.15; swapping the two heads'
    # scales gives 0.25-0.40.
    assert error < {"fp8": 0.06, "int8": 0.02}[codes]


triton_only = pytest.mark.skipif(
    not HAS_TRITON
    or (DEVICE == "cpu" and type(attention_triton._paged_attention_kernel).__name__ != "InterpretedFunction"),
    reason="no Triton, or no CUDA and the kernels were imported before TRITON_INTERPRET=1 was set",
)

# (codes, q dtype, heads, kv heads, head_dim, block_size, window, num_splits): each axis covered at least once.
TRITON_CASES = {
    "fp8-fp32-gqa2": ("fp8", torch.float32, 4, 2, 64, 4, None, None),
    "int8-fp32-mha-split3": ("int8", torch.float32, 2, 2, 64, 16, None, 3),
    "fp8-bf16-window-split2": ("fp8", torch.bfloat16, 4, 1, 80, 4, 5, 2),
    "int8-fp16-gqa4-bs1": ("int8", torch.float16, 8, 2, 64, 1, None, None),
}


@triton_only
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_attention_equals_reference(case: str) -> None:
    codes, q_dtype, heads, kv_heads, head_dim, block_size, window, splits = TRITON_CASES[case]
    step = _quantized_step(_shapes(block_size), heads, kv_heads, head_dim, block_size, CODES[codes], q_dtype,
                           seed=list(TRITON_CASES).index(case), device=DEVICE)
    out = torch.full_like(step["q"], float("nan"))
    attention_triton.paged_attention_triton(**step, scale=head_dim**-0.5, sliding_window=window, num_splits=splits,
                                            out=out)
    assert torch.isfinite(out).all(), "the kernel left rows unwritten or read slots it does not own"
    expected = _reference(step, head_dim**-0.5, window)
    tol = TOLERANCE[q_dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


native_only = pytest.mark.skipif(not native_decode_available(), reason="native kernel unavailable (no compiler)")


@native_only
@pytest.mark.parametrize(
    "num_seqs,num_heads,num_kv_heads,head_dim,block_size",
    [(3, 4, 2, 64, 16), (20, 8, 4, 64, 16), (20, 12, 1, 80, 4)],  # per-head items, per-sequence items, MQA
)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("codes", list(CODES))
def test_native_decodes_equal_the_reference(
    monkeypatch, codes, num_seqs, num_heads, num_kv_heads, head_dim, block_size, window
) -> None:
    rng = random.Random(num_seqs * head_dim)
    shapes = [(rng.randint(0, 5 * block_size + 2), 1) for _ in range(num_seqs)] + [(3, 6)]  # decodes and a chunk
    step = _quantized_step(shapes, num_heads, num_kv_heads, head_dim, block_size, CODES[codes], torch.float32,
                           seed=num_seqs)
    expected = _reference(step, head_dim**-0.5, window)

    def refuse(*args, **kwargs):
        raise AssertionError("the decode rows fell back to the torch reference")

    monkeypatch.setattr(cpu_attention, "attend_decodes_reference", refuse)
    monkeypatch.setattr(cpu_attention, "paged_attention_reference", refuse)
    # The chunk runs the reference, which reads whole blocks: give it the step with NaN scales zeroed.
    step = dict(step, k_scales=step["k_scales"].nan_to_num(0.0), v_scales=step["v_scales"].nan_to_num(0.0))
    out = paged_attention_cpu(**step, scale=head_dim**-0.5, sliding_window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@native_only
def test_native_decode_reads_no_slot_it_does_not_own() -> None:
    shapes = [(9, 1), (0, 1), (30, 1), (16, 1)]
    step = _quantized_step(shapes, 4, 2, 32, 8, FP8_DTYPE, torch.float32, seed=4)
    out = paged_attention_cpu(**step, scale=0.2)  # all decodes: the native kernel alone, NaN scales left in
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(step, 0.2), rtol=1e-5, atol=1e-5)
