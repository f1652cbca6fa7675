"""kv_cache_dtype fp8 / int8 on a worker: the pool's layout and size, block copies, the static-scale hook, and
greedy fidelity against the float cache on the tiny Llama (vLLM's check_logprobs_close rule: at the first token
where the runs differ, each run's token is among the other's top 5)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.workers.kv_pool import KVPool, bytes_per_block, kv_cache_storage_dtype
from rayinfer.workers.layers.attention import PagedAttention
from rayinfer.workers.model_config import load_model_spec

QUANTISED = ["fp8", "int8"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)


def test_storage_dtypes_and_bytes_per_block_count_codes_and_scales() -> None:
    assert kv_cache_storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_storage_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    assert kv_cache_storage_dtype("int8", torch.bfloat16) == torch.int8
    # 2 (K, V) x 3 layers x 16 slots x 4 heads x (128 one-byte codes + a 4-byte scale)
    assert bytes_per_block(3, 16, 4, 128, torch.float8_e4m3fn) == 2 * 3 * 16 * 4 * 132
    assert bytes_per_block(3, 16, 4, 128, torch.int8) == 2 * 3 * 16 * 4 * 132
    assert bytes_per_block(3, 16, 4, 128, torch.bfloat16) == 2 * 3 * 16 * 4 * 256  # "auto": no scales


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=QUANTISED)
def test_pool_holds_scales_and_copies_them_with_the_blocks(dtype: torch.dtype) -> None:
    pool = KVPool(2, num_blocks=4, block_size=2, num_kv_heads=3, head_dim=8, dtype=dtype, device=torch.device("cpu"))
    assert [k.dtype for k, _ in pool.layers] == [dtype, dtype]
    assert pool.scales is not None and pool.scales[0][0].shape == (4, 2, 3)
    for layer, (k, v) in enumerate(pool.layers):
        k.view(torch.uint8).copy_(torch.randint(0, 100, k.shape, dtype=torch.uint8))
        v.view(torch.uint8).copy_(torch.randint(0, 100, v.shape, dtype=torch.uint8))
        for scales in pool.scales[layer]:
            scales.copy_(torch.rand(scales.shape))
    before = [[t.clone() for t in pair] for pair in pool.layers + pool.scales]
    pool.copy_blocks([(1, 3), (0, 2)])
    for was, now in zip(before, [list(pair) for pair in pool.layers + pool.scales]):
        for old, new in zip(was, now):
            old_bits, new_bits = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (old, new))
            assert torch.equal(new_bits[3], old_bits[1]) and torch.equal(new_bits[2], old_bits[0])
            assert torch.equal(new_bits[:2], old_bits[:2])


def test_a_float_pool_has_no_scales() -> None:
    pool = KVPool(1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert pool.scales is None


def _llm(model_dir: Path, kv_cache_dtype: str, **config: object) -> LLM:
    llm = LLM(str(model_dir), dtype="float32", kv_cache_dtype=kv_cache_dtype, **config)
    pool = llm.engine.executor.worker.runner.kv_pool
    assert pool.layers[0][0].dtype == kv_cache_storage_dtype(kv_cache_dtype, torch.float32)
    return llm


def test_fp8_pool_holds_over_3x_the_tokens_of_a_float32_one(llama_dir: Path) -> None:
    memory = dict(kv_cache_memory_bytes=1 << 20)
    blocks = {kind: _llm(llama_dir, kind, **memory).engine.block_manager.num_blocks for kind in ["auto", *QUANTISED]}
    # The tiny Llama's head_dim of 16: 64 bytes per float32 row against 16 + a 4-byte scale.
    assert blocks["fp8"] >= 3 * blocks["auto"] and blocks["int8"] >= 3 * blocks["auto"]
    spec = load_model_spec(llama_dir)
    expected = (1 << 20) // bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, torch.float8_e4m3fn)
    assert blocks["fp8"] == expected


def _top5(entry: dict) -> set[int]:
    return {token for token, logprob in entry.items() if logprob.rank is not None and logprob.rank <= 5}


def _assert_logprobs_close(reference: list, quantised: list, kind: str) -> None:
    """At the first position where the greedy tokens differ (if any), each run's token is in the other's top 5."""
    for ours, theirs in zip(reference, quantised, strict=True):
        want, got = ours.outputs[0], theirs.outputs[0]
        assert len(want.token_ids) == len(got.token_ids)
        for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)):
            if a != b:
                assert b in _top5(want.logprobs[i]), f"{kind}, position {i}: {b} not in the float run's top 5"
                assert a in _top5(got.logprobs[i]), f"{kind}, position {i}: {a} not in the {kind} run's top 5"
                break


def _prompts(seed: int, count: int, length: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 500) for _ in range(length)] for _ in range(count)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    return outputs


def test_greedy_tokens_stay_within_the_float_runs_top5(llama_dir: Path) -> None:
    prompts = _prompts(0, 4)
    reference = _generate(_llm(llama_dir, "auto"), prompts)
    for kind in QUANTISED:
        _assert_logprobs_close(reference, _generate(_llm(llama_dir, kind), prompts), kind)


def test_prefix_cached_quantised_blocks_are_reused_faithfully(llama_dir: Path) -> None:
    shared = _prompts(1, 1, 16)[0]  # two full blocks of 8
    first = [shared + tail for tail in _prompts(2, 2, 4)]
    second = [shared + tail for tail in _prompts(3, 2, 5)]
    runs = {}
    for kind in ("auto", *QUANTISED):
        llm = _llm(llama_dir, kind, block_size=8, enable_prefix_caching=True)
        _generate(llm, first)
        hits = llm.engine.block_manager.num_prefix_hits
        runs[kind] = _generate(llm, second)
        assert llm.engine.block_manager.num_prefix_hits - hits >= 2 * 16  # the second wave read cached codes
    for kind in QUANTISED:
        _assert_logprobs_close(runs["auto"], runs[kind], kind)


def test_preempted_and_chunked_sequences_stay_faithful(llama_dir: Path) -> None:
    spec = load_model_spec(llama_dir)
    prompts = _prompts(4, 3, 24)
    runs = {}
    for kind in ("auto", *QUANTISED):
        block_bytes = bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                      kv_cache_storage_dtype(kind, torch.float32))
        # 5 blocks = 80 tokens: each request (40 tokens) fits alone, not all three; prompts split over steps of 16.
        llm = _llm(llama_dir, kind, kv_cache_memory_bytes=5 * block_bytes, max_num_batched_tokens=16)
        runs[kind] = _generate(llm, prompts)
        assert llm.engine.scheduler.num_preemptions > 0
    for kind in QUANTISED:
        _assert_logprobs_close(runs["auto"], runs[kind], kind)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-layer", "per-head"])
def test_static_scales_on_the_attention_layers_are_what_the_pool_stores(llama_dir: Path, per_head: bool) -> None:
    llm = _llm(llama_dir, "fp8")
    worker = llm.engine.executor.worker
    layers = [m for m in worker.model.modules() if isinstance(m, PagedAttention)]
    heads = layers[0].num_kv_heads
    k_scale = torch.tensor([0.05, 0.08][:heads] if per_head else [0.06])
    for layer in layers:
        layer.k_scale, layer.v_scale = k_scale, torch.tensor(0.04)
    reference = _generate(_llm(llama_dir, "auto"), _prompts(5, 2))
    quantised = _generate(llm, _prompts(5, 2))
    _assert_logprobs_close(reference, quantised, "fp8 with static scales")
    for k_scales, v_scales in worker.runner.kv_pool.scales:
        written = k_scales.view(-1, heads)[k_scales.view(-1, heads)[:, 0] != 0]
        assert written.shape[0] >= 2 * 35  # every slot the two sequences wrote
        assert torch.equal(written, k_scale.expand(heads).expand_as(written))
        assert torch.equal(v_scales[v_scales != 0].unique(), torch.tensor([0.04]))
