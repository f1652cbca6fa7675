"""Greedy output equals transformers' generate(do_sample=False) token for token, in float32."""
from __future__ import annotations

from pathlib import Path

import pytest

from rayinfer.cluster import LLM, SamplingParams

NEW_TOKENS = 32

# Prompts of different lengths (1 to ~60 tokens) so chunks, block boundaries and decode rows all mix.
PROMPT_TEXTS = [
    "A",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman",
    "def add(a, b):\n    return a + b",
    "café naïve 日本語 🙂",
    "Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted. "
    "An inference engine schedules requests, batches them together, and keeps a cache of keys and values.",
    "What is the capital of France?",
]

CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}),
    "llama-rope-dynamic": (
        "llama",
        {"max_position_embeddings": 80, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    "llama-rope-llama3": (
        "llama",
        {
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        },
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 16}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-mqa-tied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    # Sliding window on the layers from max_window_layers on, full attention below.
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
}


def _prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(text) for text in PROMPT_TEXTS]


_references: dict[str, list[list[int]]] = {}


def _reference(name: str, model_dir: Path, prompts: list[list[int]], hf_greedy) -> list[list[int]]:
    if name not in _references:
        _references[name] = hf_greedy(model_dir, prompts, NEW_TOKENS)
        distinct = {t for out in _references[name] for t in out}
        # A collapsed random model would hide bugs: the reference itself must vary.
        assert len(distinct) > 40, f"{name}: reference output collapsed to {len(distinct)} distinct tokens"
    return _references[name]


def _generate(model_dir: Path, prompts: list[list[int]], **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), dtype="float32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks, "KV blocks leaked"
    return [out.outputs[0].token_ids for out in outputs], llm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, tiny_checkpoint, hf_greedy) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = _prompts(model_dir)
    # A 24-token budget splits the longer prompts across steps while decodes run beside them.
    ours, _ = _generate(model_dir, prompts, max_num_batched_tokens=24)
    assert ours == _reference(name, model_dir, prompts, hf_greedy)


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param({"enable_chunked_prefill": False}, id="no-chunked-prefill"),
        pytest.param({"max_num_batched_tokens": 16}, id="budget-16"),
        pytest.param({"max_num_batched_tokens": 7, "block_size": 4}, id="budget-7-block-4"),
        pytest.param({"max_num_seqs": 3}, id="max-seqs-3"),
    ],
)
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding"])
def test_scheduling_does_not_change_output(name: str, engine_args: dict, tiny_checkpoint, hf_greedy) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = _prompts(model_dir)
    ours, _ = _generate(model_dir, prompts, **engine_args)
    assert ours == _reference(name, model_dir, prompts, hf_greedy)


def test_preemption_keeps_output_exact(tiny_checkpoint, hf_greedy) -> None:
    model_dir = tiny_checkpoint("llama")
    prompts = _prompts(model_dir)
    from rayinfer.workers.kv_pool import bytes_per_block
    from rayinfer.workers.model_config import load_model_spec

    import torch

    spec = load_model_spec(model_dir)
    block_bytes = bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, torch.float32)
    # 9 blocks = 144 tokens: the longest request (97 + 32 tokens) fits alone, the whole batch does not.
    ours, llm = _generate(model_dir, prompts, kv_cache_memory_bytes=9 * block_bytes, max_num_batched_tokens=32)
    assert llm.engine.scheduler.num_preemptions > 0
    assert ours == _reference("llama-gqa", model_dir, prompts, hf_greedy)


def test_sharded_checkpoint_loads(tiny_checkpoint, hf_greedy) -> None:
    model_dir = tiny_checkpoint("llama", max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    prompts = _prompts(model_dir)
    ours, _ = _generate(model_dir, prompts)
    assert ours == hf_greedy(model_dir, prompts, NEW_TOKENS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "qwen2-bias"])
def test_greedy_matches_transformers_on_cuda(name: str, tiny_checkpoint, hf_greedy) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = _prompts(model_dir)
    ours, _ = _generate(model_dir, prompts, max_num_batched_tokens=24, device="cuda")
    assert ours == _reference(name, model_dir, prompts, hf_greedy)
