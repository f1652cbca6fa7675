"""Phi-3, Starcoder2, OLMo, StableLM and Cohere: greedy output equals transformers' generate(do_sample=False)
token for token (float32), with chunked prefill splitting the prompts, plus the pieces peculiar to each family
(fused checkpoint tensors, LayerNorm variants, clip_qkv, per-head q/k norms, parallel residuals, interleaved
rotary, logit_scale), their tensor-parallel sharding and the configs they refuse."""
from __future__ import annotations

import json

import pytest
import torch

from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

NEW_TOKENS = 24
WINDOW = 8  # shorter than the longer prompts: the sliding window really cuts the context
CLIP_QKV = 1.0  # small enough that q, k and v entries get clamped

ARCHITECTURES = {
    "phi3": "Phi3ForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "cohere": "CohereForCausalLM",
}

# The tiny preset is 4 heads over 2 KV heads (GQA), untied, head_dim 16.
CONFIGS = {
    "phi3-gqa": ("phi3", {}),
    "phi3-mqa-window-partial-tied": (
        "phi3",
        {"num_key_value_heads": 1, "sliding_window": WINDOW, "partial_rotary_factor": 0.5, "tie_word_embeddings": True},
    ),
    "starcoder2-gqa-window": ("starcoder2", {"sliding_window": WINDOW}),
    "starcoder2-gqa-tied": ("starcoder2", {"tie_word_embeddings": True}),  # its checkpoints tie the head
    "starcoder2-mqa-nobias-erf-gelu": ("starcoder2", {"num_key_value_heads": 1, "use_bias": False, "hidden_act": "gelu"}),
    "olmo-gqa-clip": ("olmo", {"clip_qkv": CLIP_QKV}),
    "olmo-mha-tied-bias": ("olmo", {"num_key_value_heads": 4, "tie_word_embeddings": True, "attention_bias": True}),
    "stablelm-sequential-qknorm-bias": ("stablelm", {"qk_layernorm": True, "use_qkv_bias": True}),
    "stablelm-parallel-mqa-tied": (
        "stablelm",
        {"use_parallel_residual": True, "num_key_value_heads": 1, "tie_word_embeddings": True,
         "partial_rotary_factor": 0.5},
    ),
    "stablelm-parallel-qknorm": ("stablelm", {"use_parallel_residual": True, "qk_layernorm": True}),
    "cohere-gqa-untied": ("cohere", {}),
    "cohere-qknorm-tied-bias": ("cohere", {"use_qk_norm": True, "tie_word_embeddings": True, "attention_bias": True}),
    "cohere-mqa-tied": ("cohere", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(
    name: str, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy, varied
) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[arch]]
    prompts = coverage_prompts(model_dir)
    assert max(len(p) for p in prompts) > 16  # the budget below splits the longer prompts across steps
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    varied(name, reference)
    assert rayinfer_greedy(model_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) == reference
