"""Triton paged attention and KV write against their torch references, on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET is read when a kernel is
decorated (when rayinfer.kernels.attention_triton is first imported), so it must be set before any module of the
session imports the kernels: tests/conftest.py sets it for the whole suite; the line below covers running this
file on its own, and the module skips itself if the kernels were nonetheless compiled for a GPU it does not have.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

from rayinfer.kernels import attention_split_kv, attention_triton  # noqa: E402
from rayinfer.kernels.attention_reference import paged_attention_reference  # noqa: E402
from rayinfer.kernels.kv_cache_write import write_kv_reference, write_kv_triton  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform"),
    pytest.mark.skipif(
        DEVICE == "cpu" and type(attention_triton._paged_attention_kernel).__name__ != "InterpretedFunction",
        reason="no CUDA and the kernels were imported before TRITON_INTERPRET=1 was set",
    ),
]


def _make_step(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Random step: shapes are (context already in the pool, new tokens). The pool is NaN except the slots the
    sequences own (their new tokens' K/V included, as the layer writes them before attending)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-(c + n) // block_size) for c, n in shapes)
    num_blocks = blocks_needed + 2
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    free = list(range(num_blocks))
    rng.shuffle(free)
    nan_block = free.pop()  # the kernel's block tables are padded with it: reading padding poisons the output
    tables, starts, lens = [], [0], []
    for context, new in shapes:
        total = context + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(total)])
        for cache in (k_cache, v_cache):
            values = torch.randn(total, num_kv_heads, head_dim, generator=gen)
            cache.view(-1, num_kv_heads, head_dim)[slots] = values.to(dtype)
        tables.append(table)
        starts.append(starts[-1] + new)
        lens.append(total)
    width = max(len(t) for t in tables) + 1
    q = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(dtype)
    return {
        "q": q.to(DEVICE),
        "k_cache": k_cache.to(DEVICE),
        "v_cache": v_cache.to(DEVICE),
        "block_tables": torch.tensor([t + [nan_block] * (width - len(t)) for t in tables], device=DEVICE),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=DEVICE),
    }


def _check(step, scale, *, window=None, soft_cap=None, alibi=None, num_splits=None, hints=True):
    """Runs the kernel (into a NaN-filled output) and the reference (on the pool with NaN zeroed, since it reads
    whole blocks and padded table entries) and compares them within the dtype's tolerance."""
    q = step["q"]
    lens = step["seq_lens"].tolist()
    starts = step["query_start_loc"].tolist()
    hint = {}
    if hints:
        hint = {"max_query_len": max(b - a for a, b in zip(starts, starts[1:])), "max_seq_len": max(lens)}
    out = torch.full_like(q, float("nan"))
    result = attention_triton.paged_attention_triton(
        q,
        step["k_cache"],
        step["v_cache"],
        step["block_tables"],
        step["query_start_loc"],
        step["seq_lens"],
        scale,
        window,
        soft_cap,
        alibi,
        num_splits=num_splits,
        out=out,
        **hint,
    )
    assert result is out
    expected = paged_attention_reference(
        q,
        step["k_cache"].nan_to_num(0.0),
        step["v_cache"].nan_to_num(0.0),
        step["block_tables"],  # padded with a block that is all zero here
        step["query_start_loc"],
        step["seq_lens"],
        scale,
        window,
        soft_cap,
        alibi,
    )
    assert torch.isfinite(out).all(), "the kernel left rows unwritten or read NaN slots it does not own"
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def _shapes(block_size):
    """Decodes, a one-token prompt, whole prompts, later chunks, chunks ending and starting on block edges."""
    return [(7, 1), (0, 1), (block_size - 1, 1), (0, 9), (5, 3), (block_size, block_size), (3 * block_size - 2, 2)]


def _alibi(num_heads):
    return torch.tensor([2.0 ** (-(i + 1) / 2) for i in range(num_heads)], device=DEVICE)


# (heads, kv heads, head_dim, block_size, dtype, window, soft_cap, alibi, num_splits): each axis is covered at
# least once rather than the full product, which the interpreter could not run in a reasonable time.
MIXED_CASES = {
    "mha-d64-bs16-fp32": (2, 2, 64, 16, torch.float32, None, None, False, None),
    "gqa2-d80-bs4-fp16": (4, 2, 80, 4, torch.float16, None, None, False, None),
    "gqa4-d96-bs32-bf16": (8, 2, 96, 32, torch.bfloat16, None, None, False, None),
    "gqa8-d128-bs1-fp32": (8, 1, 128, 1, torch.float32, None, None, False, None),
    "mqa-group3-d64-bs4-fp16": (3, 1, 64, 4, torch.float16, None, None, False, None),
    "gqa2-d256-bs16-bf16": (4, 2, 256, 16, torch.bfloat16, None, None, False, None),
    "window-bs4-fp32": (4, 2, 64, 4, torch.float32, 5, None, False, None),
    "window-bs1-fp16": (2, 1, 64, 1, torch.float16, 3, None, False, None),
    "softcap-fp32": (4, 2, 64, 4, torch.float32, None, 3.0, False, None),
    "alibi-fp16": (4, 1, 64, 16, torch.float16, None, None, True, None),
    "all-options-bf16": (4, 2, 80, 4, torch.bfloat16, 6, 2.0, True, None),
    "split2-mixed-fp32": (4, 2, 64, 4, torch.float32, None, None, False, 2),
    "split3-window-alibi-fp16": (4, 1, 64, 1, torch.float16, 7, None, True, 3),
    "split7-softcap-bs32-fp32": (2, 1, 96, 32, torch.float32, None, 4.0, False, 7),
}


@pytest.mark.parametrize("case", list(MIXED_CASES), ids=list(MIXED_CASES))
def test_mixed_step_matches_reference(case: str) -> None:
    heads, kv_heads, head_dim, block_size, dtype, window, soft_cap, alibi, splits = MIXED_CASES[case]
    seed = list(MIXED_CASES).index(case)
    step = _make_step(_shapes(block_size), heads, kv_heads, head_dim, block_size, dtype, seed=seed)
    # A scale above 1/sqrt(d) makes soft-capping bite and the softmax peaky.
    scale = head_dim**-0.5 * (4.0 if soft_cap else 1.0)
    _check(step, scale, window=window, soft_cap=soft_cap, alibi=_alibi(heads) if alibi else None, num_splits=splits)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_decode_only_step_with_and_without_split(num_splits: int) -> None:
    # 16 splits > the 6 tiles of the longest sequence; the one-token sequence leaves every split but one empty.
    shapes = [(0, 1), (40, 1), (185, 1), (16, 1)]
    step = _make_step(shapes, 4, 2, 64, 16, torch.float32, seed=num_splits)
    _check(step, 64**-0.5, num_splits=num_splits, hints=num_splits % 2 == 0)


def test_one_token_prompts_and_empty_chunks() -> None:
    # Sequences with no new tokens this step own no rows; the kernel must neither write nor trip over them.
    shapes = [(0, 1), (3, 0), (0, 1), (9, 0), (0, 2)]
    step = _make_step(shapes, 2, 1, 64, 4, torch.float16, seed=3)
    _check(step, 0.125, hints=False)


def test_long_prefill_chunk_spans_several_query_tiles() -> None:
    # 70 new tokens x group 2 = 140 rows > the 64-row float32 tile: three query tiles, the middle one interior.
    step = _make_step([(21, 70), (2, 1)], 4, 2, 64, 16, torch.float32, seed=11)
    # q as the layer passes it: a strided view into the fused qkv projection output.
    qkv = torch.randn(step["q"].shape[0], 8, 64, device=DEVICE)
    qkv[:, :4] = step["q"]
    step["q"] = qkv[:, :4]
    _check(step, 64**-0.5, window=40)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_window_start_on_kv_tile_edges(num_splits: int) -> None:
    # Decodes at positions 34..45 with windows 8 and 32: the first visible key of some of them is the first or the
    # last key of a 32-key tile, so skipping one tile too many or too few shows.
    # Keys in the KV tiles wholly before a decode's window are poisoned with NaN (the reference reads the pool
    # with NaN zeroed), so a kernel that visits a tile it should skip fails too.
    shapes = [(pos, 1) for pos in range(34, 46)]
    block_size = 4
    step = _make_step(shapes, 2, 1, 64, block_size, torch.float32, seed=num_splits)
    block_n = attention_triton._tile_config(64, 2, 1, torch.float32)[1]
    for window in (8, 32):
        poisoned = dict(step, k_cache=step["k_cache"].clone(), v_cache=step["v_cache"].clone())
        for table, length in zip(step["block_tables"].tolist(), step["seq_lens"].tolist()):
            for pos in range(max(0, length - window) // block_n * block_n):
                for cache in (poisoned["k_cache"], poisoned["v_cache"]):
                    cache[table[pos // block_size], pos % block_size] = float("nan")
        _check(poisoned, 64**-0.5, window=window, num_splits=num_splits)


def test_heuristic_splits_only_few_long_sequences() -> None:
    sm = attention_split_kv._DEFAULT_SM_COUNT
    assert attention_split_kv.choose_num_splits(busy_programs=8, max_seq_len=32768, device=torch.device("cpu")) > 16
    assert attention_split_kv.choose_num_splits(busy_programs=8, max_seq_len=512, device=torch.device("cpu")) == 1
    assert attention_split_kv.choose_num_splits(busy_programs=sm, max_seq_len=32768, device=torch.device("cpu")) == 1
    assert attention_split_kv.choose_num_splits(busy_programs=1, max_seq_len=1100, device=torch.device("cpu")) == 2


def test_heuristic_split_path_end_to_end() -> None:
    # One decode over 1100 tokens with one KV head: the heuristic picks 2 splits (at least 512 keys each).
    step = _make_step([(1099, 1)], 2, 1, 64, 128, torch.float32, seed=5)
    _check(step, 64**-0.5, hints=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference_and_skips_padding(dtype: torch.dtype) -> None:
    num_blocks, block_size, kv_heads, head_dim = 5, 4, 2, 80
    gen = torch.Generator().manual_seed(0)
    # key/value as the layer passes them: strided views into one fused qkv projection output.
    qkv = torch.randn(6, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    key = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    value = qkv[:, (4 + kv_heads) * head_dim :].view(6, kv_heads, head_dim)
    slots = torch.tensor([7, -1, 0, 19, -1, 12], device=DEVICE)
    expected_k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    expected_v = expected_k.clone()
    k_cache, v_cache = expected_k.clone(), expected_v.clone()
    write_kv_reference(key, value, expected_k, expected_v, slots)
    write_kv_triton(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(k_cache).sum() == (num_blocks * block_size - 4) * kv_heads * head_dim


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [1, 16, 32, 256])
def test_gpu_sweep(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    """Larger steps on CUDA: long prompts, many decodes, every GQA ratio, options and forced/automatic splits."""
    rng = random.Random(head_dim * 1000 + block_size)
    for heads, kv_heads in [(8, 8), (8, 4), (16, 4), (32, 4), (8, 1)]:
        shapes = [(rng.randrange(0, 600), 1) for _ in range(24)]
        shapes += [(0, rng.randrange(1, 300)), (rng.randrange(1, 900), rng.randrange(2, 200)), (0, 1)]
        step = _make_step(shapes, heads, kv_heads, head_dim, block_size, dtype, seed=rng.randrange(1 << 30))
        window = rng.choice([None, 64, 333])
        soft_cap = rng.choice([None, 30.0])
        alibi = _alibi(heads) if rng.random() < 0.3 else None
        for splits in (None, 1, 4, 13):
            _check(step, head_dim**-0.5, window=window, soft_cap=soft_cap, alibi=alibi, num_splits=splits)
    # A single long decode: the heuristic must split it (and the result must not change).
    step = _make_step([(32767, 1)], 32, 8, head_dim, block_size, dtype, seed=head_dim)
    _check(step, head_dim**-0.5)
