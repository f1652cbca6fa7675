"""Qwen3, Granite, Olmo2, Gemma and Gemma 2: greedy output equals transformers' generate(do_sample=False) token
for token (float32), with chunked prefill splitting the prompts, plus the pieces peculiar to each family."""
from __future__ import annotations


import pytest
import torch

from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

NEW_TOKENS = 24


GRANITE_MULTIPLIERS = dict(
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.5
)

# Small enough to matter: the window is shorter than the longer prompts (layer 0 slides, layer 1 is full), the caps
# bend real scores and logits, and query_pre_attn_scalar (24) is not head_dim (16).
GEMMA2_PECULIARITIES = dict(
    sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24
)
ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

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
    # Gemma checkpoints tie the head (the tiny builder's default for them); GQA 4:2 from the size preset.
    "gemma-gqa": ("gemma", {}),
    "gemma-mqa": ("gemma", {"num_key_value_heads": 1}),
    "gemma2-gqa": ("gemma2", GEMMA2_PECULIARITIES),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, greedy_matches_transformers) -> None:
    arch, overrides = CONFIGS[name]
    # transformers' sdpa/flash paths ignore Gemma 2's attention soft-cap; its eager path applies it.
    attn = "eager" if arch == "gemma2" else None
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch], attn_implementation=attn)


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


def test_gemma2_spec_and_model_read_the_peculiarities(tiny_checkpoint, coverage_prompts) -> None:
    from rayinfer.workers.weight_loader import build_model

    model_dir = tiny_checkpoint("gemma2", **GEMMA2_PECULIARITIES)
    spec = load_model_spec(model_dir)
    assert spec.sliding_windows == (8, None)
    assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (5.0, 3.0)
    assert spec.attention_scale == 24**-0.5 and spec.tie_word_embeddings
    prompts = coverage_prompts(model_dir)
    assert max(len(p) for p in prompts) > 8 + NEW_TOKENS // 2  # the window really cuts the context
    model = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
    attn = [layer.self_attn.attn for layer in model.model.layers]
    assert [a.sliding_window for a in attn] == [8, None] and {a.soft_cap for a in attn} == {5.0}
    assert model.model.embedding_multiplier == spec.hidden_size**0.5
    # Tensor parallelism: the norms and caps are per head or elementwise, nothing refuses it.
    check_tensor_parallel(spec, 2)
    # Old Gemma 2 configs (before layer_types) slide on the even layers.
    raw = {**spec.raw, "layer_types": None, "num_hidden_layers": 4}
    from rayinfer.workers.model_config import _sliding_windows

    assert _sliding_windows(raw, 4) == (8, None, 8, None)


def test_gemma_normalizer_is_rounded_to_the_model_dtype() -> None:
    from rayinfer.workers.models.gemma import embedding_normalizer

    assert embedding_normalizer(3072, torch.bfloat16) == 55.5  # sqrt(3072) = 55.4256..., as bf16
    assert embedding_normalizer(3072, torch.float32) == pytest.approx(3072**0.5)


def test_gemma2_final_softcap_caps_the_logits(tiny_checkpoint) -> None:
    """The final cap is monotonic (greedy tokens cannot show it), so compare logits, which sampling sees."""
    from transformers import AutoModelForCausalLM

    from rayinfer.workers.weight_loader import build_model

    model_dir = tiny_checkpoint("gemma2", **GEMMA2_PECULIARITIES)
    spec = load_model_spec(model_dir)
    ours = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hidden = torch.randn(3, spec.hidden_size)
    with torch.inference_mode():
        hidden = hidden * (10.0 / hf.lm_head(hidden).abs().max())  # raw logits up to 10: the cap (3.0) bends them
        raw = hf.lm_head(hidden)
        torch.testing.assert_close(ours.compute_logits(hidden), torch.tanh(raw / 3.0) * 3.0)


# Mutation checks: the same weights with one peculiarity switched off give other tokens, so the test above sees it.
@pytest.mark.parametrize(
    "mutation",
    [{"attn_logit_softcapping": None}, {"layer_types": ["full_attention"] * 2}, {"query_pre_attn_scalar": 16}],
    ids=["no-attn-softcap", "no-window", "head-dim-scale"],
)
def test_gemma2_peculiarities_change_the_output(
    mutation, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy
) -> None:
    model_dir = tiny_checkpoint("gemma2", **GEMMA2_PECULIARITIES)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS, attn_implementation="eager")
    mutated = tiny_checkpoint("gemma2", **{**GEMMA2_PECULIARITIES, **mutation})
    assert rayinfer_greedy(mutated, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference
