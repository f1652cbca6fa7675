"""EngineConfig: defaults, normalisation, and a field-naming ValueError for every bad value."""

from __future__ import annotations

import re
from typing import Any

import pytest

from rayinfer.configs import EngineConfig, resolved_limits


def test_defaults_follow_vllm() -> None:
    c = EngineConfig(model="/ckpt")
    assert c.tokenizer is None and c.revision is None and c.download_dir is None
    assert (c.dtype, c.block_size, c.gpu_memory_utilization, c.max_num_seqs) == ("auto", 16, 0.9, 256)
    assert c.max_model_len is None and c.max_num_batched_tokens is None and c.kv_cache_memory_bytes is None
    assert c.enable_chunked_prefill and not c.enable_prefix_caching
    assert (c.seed, c.tensor_parallel_size, c.device, c.max_logprobs) == (0, 1, "auto", 20)
    assert c.distributed_executor_backend is None and c.executor_backend == "uni"


@pytest.mark.parametrize(
    ("given", "expected"),
    [("auto", "auto"), ("float32", "float32"), ("fp32", "float32"), ("FP16", "float16"), ("bf16", "bfloat16")],
)
def test_dtype_aliases_are_normalised(given: str, expected: str) -> None:
    assert EngineConfig(model="m", dtype=given).dtype == expected


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("model", "", "non-empty"),
        ("tokenizer", "  ", "non-empty"),
        ("dtype", "int8", "dtype must be one of"),
        ("max_model_len", 0, ">= 1"),
        ("block_size", 24, "power of two between 1 and 256"),
        ("block_size", 0, "power of two"),
        ("block_size", 512, "power of two"),
        ("gpu_memory_utilization", 0.0, r"\(0, 1\]"),
        ("gpu_memory_utilization", 1.5, r"\(0, 1\]"),
        ("gpu_memory_utilization", float("nan"), r"\(0, 1\]"),
        ("kv_cache_memory_bytes", 0, "> 0"),
        ("max_num_seqs", 0, ">= 1"),
        ("max_num_batched_tokens", -5, ">= 1"),
        ("enable_chunked_prefill", "maybe", ""),
        ("seed", -1, ">= 0"),
        ("tensor_parallel_size", 0, ">= 1"),
        ("distributed_executor_backend", "mp", ""),
        ("device", "tpu", ""),
        ("max_logprobs", -2, ">= 0"),
    ],
)
def test_invalid_value_names_field_and_rule(field: str, value: Any, rule: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        EngineConfig(**{"model": "m", field: value})
    assert re.search(rule, str(info.value))


def test_block_size_message_is_actionable() -> None:
    with pytest.raises(ValueError, match=r"block_size must be a power of two between 1 and 256 \(got 24\)"):
        EngineConfig(model="m", block_size=24)


def test_misspelt_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match="blok_size"):
        EngineConfig(model="m", blok_size=16)


def test_assignment_is_validated() -> None:
    c = EngineConfig(model="m")
    c.block_size = 32
    with pytest.raises(ValueError, match="block_size"):
        c.block_size = 33


def test_uni_backend_cannot_run_tensor_parallel() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="m", tensor_parallel_size=2, distributed_executor_backend="uni")
    assert EngineConfig(model="m", tensor_parallel_size=2).executor_backend == "ray"
    assert EngineConfig(model="m", distributed_executor_backend="ray").executor_backend == "ray"


def test_resolved_limits_defaults() -> None:
    assert resolved_limits(EngineConfig(model="m"), 4096) == (4096, 2048)
    assert EngineConfig(model="m", max_model_len=1024).resolved_limits(4096) == (1024, 2048)
    assert resolved_limits(EngineConfig(model="m", enable_chunked_prefill=False), 4096) == (4096, 4096)
    assert resolved_limits(EngineConfig(model="m", max_num_batched_tokens=512), 4096) == (4096, 512)


def test_max_model_len_may_not_exceed_model_limit() -> None:
    with pytest.raises(ValueError, match=r"max_model_len \(8192\).*\(4096\)"):
        resolved_limits(EngineConfig(model="m", max_model_len=8192), 4096)


def test_budget_must_hold_a_prompt_without_chunking() -> None:
    c = EngineConfig(model="m", enable_chunked_prefill=False, max_num_batched_tokens=1024)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(1024\).*max_model_len \(4096\)"):
        resolved_limits(c, 4096)
    assert resolved_limits(c.model_copy(update={"max_model_len": 1024}), 4096) == (1024, 1024)
