"""The CPU attention path: the native decode kernel against the torch reference, and its fallbacks."""
from __future__ import annotations

import logging
import random
import shutil

import pytest
import torch

from rayinfer.kernels import cpu_attention
from rayinfer.kernels.attention_reference import paged_attention_reference
from rayinfer.kernels.cpu_attention import native_decode_available, paged_attention_cpu
from rayinfer.kernels.native_build import load_native_library


@pytest.fixture
def fresh_native_library(monkeypatch, tmp_path):
    """A library cache of the test's own, and no memory of earlier loads (before and after)."""
    monkeypatch.setenv("RAYINFER_CACHE_DIR", str(tmp_path))
    load_native_library.cache_clear()
    yield
    load_native_library.cache_clear()


def _decode_step(num_seqs, num_heads, num_kv_heads, head_dim, block_size, seed, prefill_lens=()):
    """A step of `num_seqs` decodes (then prefill chunks of `prefill_lens`) over shuffled pool blocks. q is a view
    into a fused QKV output, as the models pass it."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [rng.randint(1, 5 * block_size + 3) for _ in range(num_seqs)] + list(prefill_lens)
    query_lens = [1] * num_seqs + list(prefill_lens)
    blocks_needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    width = max(blocks_needed)
    tables = []
    for needed in blocks_needed:
        table = [free.pop() for _ in range(needed)]
        tables.append(table + [0] * (width - needed))
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim)
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(starts), torch.tensor(lens)


def test_native_kernel_builds_where_a_compiler_is() -> None:
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert native_decode_available()


@pytest.mark.parametrize(
    "num_seqs,num_heads,num_kv_heads,head_dim,block_size",
    [
        (3, 4, 2, 64, 16),  # few sequences: one work item per KV head
        (20, 8, 4, 64, 16),  # many: one work item per sequence, all heads
        (20, 12, 1, 80, 4),  # multi-query, a head size that is not a power of two
        (9, 8, 8, 128, 1),
        (16, 6, 3, 32, 32),
    ],
)
@pytest.mark.parametrize("window", [None, 7])
def test_native_decodes_equal_the_reference(
    monkeypatch, num_seqs, num_heads, num_kv_heads, head_dim, block_size, window
) -> None:
    if not native_decode_available():
        pytest.skip("native kernel unavailable (no compiler)")
    step = _decode_step(num_seqs, num_heads, num_kv_heads, head_dim, block_size, seed=num_seqs * head_dim)
    expected = paged_attention_reference(*step, head_dim**-0.5, window)

    def refuse(*args, **kwargs):
        raise AssertionError("the decode rows fell back to the torch reference")

    monkeypatch.setattr(cpu_attention, "attend_decodes_reference", refuse)
    torch.testing.assert_close(paged_attention_cpu(*step, head_dim**-0.5, window), expected, rtol=1e-5, atol=1e-5)


def test_mixed_step_sends_decodes_native_and_chunks_to_torch(monkeypatch) -> None:
    if not native_decode_available():
        pytest.skip("native kernel unavailable (no compiler)")
    step = _decode_step(10, 8, 2, 64, 16, seed=3, prefill_lens=(9, 30))
    expected = paged_attention_reference(*step, 0.125)
    chunk_calls = []
    real_chunks = cpu_attention.attend_chunks_reference
    monkeypatch.setattr(
        cpu_attention, "attend_chunks_reference", lambda *a: chunk_calls.append(1) or real_chunks(*a)
    )
    torch.testing.assert_close(paged_attention_cpu(*step, 0.125), expected, rtol=1e-5, atol=1e-5)
    assert chunk_calls == [1]


@pytest.mark.parametrize(
    "extra",
    [{"soft_cap": 30.0}, {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}, {"dtype": torch.bfloat16}],
)
def test_what_the_kernel_does_not_cover_runs_the_reference(monkeypatch, extra) -> None:
    q, k_cache, v_cache, tables, starts, lens = _decode_step(6, 4, 2, 32, 8, seed=5)
    dtype = extra.pop("dtype", torch.float32)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    expected = paged_attention_reference(q, k_cache, v_cache, tables, starts, lens, 0.2, **extra)

    def refuse(*args, **kwargs):
        raise AssertionError("the native kernel ran on input it does not cover")

    monkeypatch.setattr(cpu_attention, "attend_decodes_native", refuse)
    assert torch.equal(paged_attention_cpu(q, k_cache, v_cache, tables, starts, lens, 0.2, **extra), expected)


def test_switched_off_by_the_environment(monkeypatch, fresh_native_library) -> None:
    monkeypatch.setenv("RAYINFER_CPU_NATIVE", "0")
    assert load_native_library("paged_decode_cpu.c") is None
    step = _decode_step(5, 4, 2, 32, 8, seed=7)
    assert torch.equal(paged_attention_cpu(*step, 0.2), paged_attention_reference(*step, 0.2))


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, fresh_native_library, caplog) -> None:
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with caplog.at_level(logging.WARNING, logger="rayinfer.kernels.native_build"):
        assert load_native_library("paged_decode_cpu.c") is None
    assert "could not be built" in caplog.text
    step = _decode_step(5, 4, 2, 32, 8, seed=9)
    assert torch.equal(paged_attention_cpu(*step, 0.2), paged_attention_reference(*step, 0.2))


def test_the_library_is_built_once_and_reused(fresh_native_library, tmp_path) -> None:
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert load_native_library("paged_decode_cpu.c") is not None
    built = sorted((tmp_path / "native").glob("paged_decode_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    load_native_library.cache_clear()
    assert load_native_library("paged_decode_cpu.c") is not None
    assert built[0].stat().st_mtime_ns == stamp and sorted((tmp_path / "native").glob("*.so")) == built



def test_an_unwritable_cache_falls_back(monkeypatch, fresh_native_library, tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RAYINFER_CACHE_DIR", str(blocker))  # native/ cannot be made under a file
    assert load_native_library("paged_decode_cpu.c") is None


def test_loading_the_library_keeps_denormals(fresh_native_library) -> None:
    """A library linked with -ffast-math would switch the loading thread to flush denormals to zero (gcc's
    crtfastmath), changing every later op of the process; the build keeps that flag to the compile step."""
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert load_native_library("paged_decode_cpu.c") is not None
    assert 1e-310 * 1.0 != 0.0
    assert bool((torch.full((1024,), 1e-39) * 1.0 != 0).all())


def test_a_decode_row_without_keys_gives_zeros() -> None:
    if not native_decode_available():
        pytest.skip("native kernel unavailable (no compiler)")
    q, k_cache, v_cache, tables, starts, lens = _decode_step(3, 4, 2, 32, 8, seed=13)
    lens[1] = 0
    expected = paged_attention_reference(q, k_cache, v_cache, tables, starts, lens, 0.2)
    got = paged_attention_cpu(q, k_cache, v_cache, tables, starts, lens, 0.2)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
