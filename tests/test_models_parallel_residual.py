"""GPT-J, GPT-NeoX, Falcon and Phi: greedy output equals transformers' generate(do_sample=False) token for token
(float32), with chunked prefill splitting the prompts, over configs that cover each family's peculiarities."""
from __future__ import annotations

import json

import pytest
import torch

from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

NEW_TOKENS = 24

ARCHITECTURES = {
    "gptj": "GPTJForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "phi": "PhiForCausalLM",
}
FALCON_OLD = dict(new_decoder_architecture=False, num_kv_heads=None)

CONFIGS = {
    # GPT-J: interleaved rotary over rotary_dim = 4 of 16 features (the builder default), parallel block, lm_head bias.
    "gptj-partial": ("gptj", {}),
    "gptj-full-rotary-tied": ("gptj", {"rotary_dim": 16, "tie_word_embeddings": True}),
    # GPT-NeoX: a quarter of each head rotates; per-head fused qkv; both residual styles.
    "gpt_neox-parallel": ("gpt_neox", {}),
    "gpt_neox-sequential-tied": (
        "gpt_neox",
        {"use_parallel_residual": False, "tie_word_embeddings": True, "rope_theta": 500.0},
    ),
    "gpt_neox-no-bias": ("gpt_neox", {"attention_bias": False, "hidden_act": "gelu_new"}),
    # Falcon: new architecture (GQA 4:2, ln_attn + ln_mlp), one norm variant, biases; old MQA, old MHA.
    "falcon-new-gqa": ("falcon", {}),
    "falcon-new-one-norm-bias-tied": (
        "falcon",
        {"num_ln_in_parallel_attn": 1, "bias": True, "tie_word_embeddings": True, "num_kv_heads": 1},
    ),
    "falcon-old-mqa-parallel": ("falcon", FALCON_OLD),
    "falcon-old-mha-sequential-bias": (
        "falcon",
        {**FALCON_OLD, "multi_query": False, "parallel_attn": False, "bias": True},
    ),
    # Phi: partial rotary (half), biases everywhere, GQA; qk_layernorm; tied head with its bias.
    "phi-gqa": ("phi", {}),
    "phi-qk-layernorm-mha": ("phi", {"qk_layernorm": True, "num_key_value_heads": 4}),
    "phi-tied-quarter-rotary": (
        "phi", {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
    ),
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
