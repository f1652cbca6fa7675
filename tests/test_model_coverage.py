"""Qwen3, Granite and Olmo2: greedy output equals transformers' generate(do_sample=False) token for token (float32),
with chunked prefill splitting the prompts, plus the pieces peculiar to each family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

NEW_TOKENS = 24

PROMPT_TEXTS = [
    "A",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman",
    "café naïve 日本語 🙂",
    "Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted.",
]

GRANITE_MULTIPLIERS = dict(
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.5
)

CONFIGS = {
    "qwen3-gqa": ("qwen3", {}),
    "qwen3-mqa-tied": ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "granite-gqa": ("granite", GRANITE_MULTIPLIERS),
    "granite-tied-bias": (
        "granite",
        # Tied: a large embedding multiplier would make the tied head echo the input token; scale it down instead.
        {
            "embedding_multiplier": 0.5, "residual_multiplier": 1.5, "attention_multiplier": 0.3, "logits_scaling": 0.7,
            "tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 1,
        },
    ),
    "olmo2-gqa": ("olmo2", {}),
    "olmo2-mha-tied": ("olmo2", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
}


def _prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(text) for text in PROMPT_TEXTS]


def _generate(model_dir: Path, prompts: list[list[int]], **engine_args) -> list[list[int]]:
    llm = LLM(str(model_dir), dtype="float32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks, "KV blocks leaked"
    return [out.outputs[0].token_ids for out in outputs]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, tiny_checkpoint, hf_greedy) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [{"qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM",
                                        "olmo2": "Olmo2ForCausalLM"}[arch]]
    prompts = _prompts(model_dir)
    assert max(len(p) for p in prompts) > 16  # the budget below splits the longer prompts across steps
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    distinct = {t for out in reference for t in out}
    assert len(distinct) > 30, f"{name}: reference output collapsed to {len(distinct)} distinct tokens"
    assert all(len(set(out)) > 4 for out in reference), reference
    assert _generate(model_dir, prompts, max_num_batched_tokens=16) == reference


def test_granite_spec_reads_multipliers_and_scales_logits(tiny_checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    from rayinfer.workers.models import model_class_for
    from rayinfer.workers.weight_loader import build_model

    model_dir = tiny_checkpoint("granite", **GRANITE_MULTIPLIERS)
    spec = load_model_spec(model_dir)
    assert (spec.embedding_multiplier, spec.residual_multiplier) == (3.0, 0.5)
    assert (spec.attention_scale, spec.logits_divisor) == (0.1, 2.5)
    ours = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
    assert ours.model.layers[0].self_attn.attn.scale == 0.1
    # Logits (not only their argmax) match: logits_scaling divides them, which sampling and logprobs see.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden = torch.randn(3, spec.hidden_size)
    with torch.inference_mode():
        expected = hf.lm_head(hidden) / 2.5
        torch.testing.assert_close(ours.compute_logits(hidden), expected)
    assert model_class_for(spec) is type(ours)
    llama_spec = load_model_spec(tiny_checkpoint("llama"))
    assert (llama_spec.attention_scale, llama_spec.logits_divisor, llama_spec.residual_multiplier) == (None, 1.0, 1.0)


def test_olmo2_refuses_tensor_parallel_with_a_clear_error(tiny_checkpoint) -> None:
    spec = load_model_spec(tiny_checkpoint("olmo2"))
    check_tensor_parallel(spec, 1)
    with pytest.raises(ValueError, match="q/k norm|q_norm/k_norm.*tensor_parallel_size 1"):
        check_tensor_parallel(spec, 2)
    # Qwen3's per-head norm splits with the heads: TP stays allowed.
    check_tensor_parallel(load_model_spec(tiny_checkpoint("qwen3")), 2)


def test_qwen3_sliding_window_follows_use_sliding_window(tiny_checkpoint) -> None:
    spec = load_model_spec(tiny_checkpoint("qwen3"))
    assert spec.sliding_windows == (None,) * spec.num_layers
