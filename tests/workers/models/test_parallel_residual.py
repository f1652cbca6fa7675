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
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

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
    # Falcon ALiBi (no rotary at all): per-head qkv (parallel block) and MQA (sequential block), with biases.
    "falcon-alibi-mha-parallel-bias": ("falcon", {**FALCON_OLD, "alibi": True, "multi_query": False, "bias": True}),
    "falcon-alibi-mqa-sequential-bias": ("falcon", {**FALCON_OLD, "alibi": True, "parallel_attn": False, "bias": True}),
    # Phi: partial rotary (half), biases everywhere, GQA; qk_layernorm; tied head with its bias.
    "phi-gqa": ("phi", {}),
    "phi-qk-layernorm-mha": ("phi", {"qk_layernorm": True, "num_key_value_heads": 4}),
    "phi-tied-quarter-rotary": (
        "phi", {"tie_word_embeddings": True, "rope_parameters": {**DEFAULT_ROPE, "partial_rotary_factor": 0.25}},
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, greedy_matches_transformers) -> None:
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch])


# Mutation checks: the same family with one peculiarity switched (in config.json or in our model) gives other
# tokens, so the equality above can see it.
@pytest.mark.parametrize(
    ("name", "mutation"),
    [
        ("gptj-partial", {"rotary_dim": 8}),
        ("gpt_neox-parallel", {"use_parallel_residual": False}),
        ("gpt_neox-parallel", {"rope_parameters": {**DEFAULT_ROPE, "partial_rotary_factor": 0.5}}),
        ("phi-gqa", {"rope_theta": 100.0}),
    ],
    ids=["gptj-rotary-dim", "neox-sequential-residual", "neox-rotary-pct", "phi-rope-theta"],
)
def test_config_peculiarities_change_the_output(
    name: str, mutation: dict, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy
) -> None:
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    mutated = tiny_checkpoint(arch, **{**overrides, **mutation})
    assert rayinfer_greedy(mutated, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


@pytest.mark.parametrize(
    ("name", "model_class", "field"),
    [("gptj-partial", "GPTJForCausalLM", "neox_rotary"), ("phi-gqa", "PhiForCausalLM", "neox_rotary")],
    ids=["gptj-interleaved-rotary", "phi-neox-rotary"],
)
def test_model_peculiarities_change_the_output(
    name: str, model_class: str, field: str, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy,
    monkeypatch,
) -> None:
    """The rotary style (GPT-J interleaved, the others neox halves) is no config key: flip it in our layout."""
    from dataclasses import replace

    from rayinfer.workers import models

    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    cls = models.MODEL_REGISTRY[model_class]
    original = cls.block_layout.__func__

    def flipped(klass, spec):
        layout = original(klass, spec)
        return replace(layout, **{field: not getattr(layout, field)})

    monkeypatch.setattr(cls, "block_layout", classmethod(flipped))
    assert rayinfer_greedy(model_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


@pytest.mark.parametrize("name", ["gptj-full-rotary-tied", "phi-tied-quarter-rotary", "phi-gqa"])
def test_lm_head_bias_reaches_the_logits(name: str, tiny_checkpoint) -> None:
    """Logits (not only their argmax) equal transformers' lm_head, bias included, tied or not."""
    from transformers import AutoModelForCausalLM

    from rayinfer.workers.weight_loader import build_model

    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    spec = load_model_spec(model_dir)
    ours = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf.lm_head.bias is not None and bool(hf.lm_head.bias.abs().max() > 0)
    hidden = torch.randn(3, spec.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(ours.compute_logits(hidden), hf.lm_head(hidden))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == spec.tie_word_embeddings


def test_specs_read_each_familys_keys(tiny_checkpoint) -> None:
    gptj = load_model_spec(tiny_checkpoint("gptj"))
    assert (gptj.hidden_size, gptj.num_heads, gptj.num_layers, gptj.intermediate_size) == (64, 4, 2, 128)
    assert gptj.hidden_act == "gelu_new" and gptj.raw["rotary_dim"] == 4
    neox = load_model_spec(tiny_checkpoint("gpt_neox"))
    assert (neox.rope.rot_dim, neox.rope.theta, neox.hidden_act) == (4, 10000.0, "gelu")
    falcon_new = load_model_spec(tiny_checkpoint("falcon"))
    assert (falcon_new.num_kv_heads, falcon_new.intermediate_size, falcon_new.rope.rot_dim) == (2, 128, 16)
    falcon_mqa = load_model_spec(tiny_checkpoint("falcon", **FALCON_OLD))
    assert falcon_mqa.num_kv_heads == 1
    phi = load_model_spec(tiny_checkpoint("phi"))
    assert (phi.rope.rot_dim, phi.hidden_act, phi.num_kv_heads) == (8, "gelu_new", 2)


def test_older_config_keys_and_defaults_are_normalised() -> None:
    from rayinfer.workers.hf_config import normalize_config

    neox = normalize_config({"model_type": "gpt_neox", "rotary_pct": 0.5, "rotary_emb_base": 500})
    assert (neox["partial_rotary_factor"], neox["rope_theta"]) == (0.5, 500)
    neox_default = normalize_config({"model_type": "gpt_neox"})  # transformers' defaults when the keys are absent
    assert (neox_default["partial_rotary_factor"], neox_default["rope_theta"]) == (0.25, 10000.0)
    gptj = normalize_config({"model_type": "gptj", "n_embd": 32, "n_head": 4, "n_layer": 1, "n_inner": None})
    assert (gptj["hidden_size"], gptj["intermediate_size"], gptj["hidden_act"]) == (32, 128, "gelu_new")
    falcon = normalize_config({"model_type": "falcon", "n_embed": 32, "n_head": 4, "n_layer": 2})
    assert (falcon["hidden_size"], falcon["num_attention_heads"], falcon["num_hidden_layers"]) == (32, 4, 2)
    assert (falcon["num_key_value_heads"], falcon["tie_word_embeddings"], falcon["intermediate_size"]) == (1, True, 128)
    falcon_mha = normalize_config(
        {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "multi_query": False}
    )
    assert falcon_mha["num_key_value_heads"] == 4
    phi = normalize_config({"model_type": "phi", "rope_parameters": {"rope_theta": 10000.0}})
    assert (phi["partial_rotary_factor"], phi["hidden_act"]) == (0.5, "gelu_new")


def _with_config(model_dir, tmp_path, **changes):
    """A copy of the checkpoint folder whose config.json has `changes` applied."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("arch", "changes", "message"),
    [
        ("falcon", {"parallel_attn": False}, "new_decoder_architecture=True needs parallel_attn=True"),
        ("gpt_neox", {"hidden_act": "swiglu"}, "hidden_act 'swiglu' is not supported"),
        ("gptj", {"rotary_dim": 5}, r"rotary_dim \(5\) must be even"),
    ],
    ids=["falcon-new-sequential", "neox-activation", "gptj-odd-rotary-dim"],
)
def test_unsupported_configs_fail_clearly(arch: str, changes: dict, message: str, tiny_checkpoint, tmp_path) -> None:
    from rayinfer.workers.weight_loader import build_model

    model_dir = _with_config(tiny_checkpoint(arch), tmp_path, **changes)
    spec = load_model_spec(model_dir)
    with pytest.raises(ValueError, match=message):
        build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)


def _hf_qkv_heads(name: str, fused: torch.Tensor, hf_attention) -> tuple[torch.Tensor, ...]:
    """transformers' own split of a fused query_key_value weight into q, k, v rows, one [heads, d, in] each:
    the weight's transpose goes through the attention's split as if it were a batch of activations."""
    as_activations = fused.t().unsqueeze(0)  # [1, in, out]
    if name.startswith("gpt_neox"):
        d = hf_attention.head_size
        q, k, v = as_activations.view(1, fused.shape[1], -1, 3 * d).chunk(3, dim=-1)
    elif hasattr(hf_attention, "_split_heads"):  # transformers <= 5.24
        q, k, v = hf_attention._split_heads(as_activations)
        if hf_attention.new_decoder_architecture:  # keys/values come broadcast to every query head: one per group
            group = hf_attention.num_heads // hf_attention.num_kv_heads
            k, v = k[:, :, ::group], v[:, :, ::group]
    else:  # transformers 5.25 split inline in `FalconAttention.forward`; the same three layouts, written as it does
        d, heads = hf_attention.head_dim, hf_attention.num_heads
        fused_heads = as_activations.view(1, fused.shape[1], -1, d)
        if hf_attention.new_decoder_architecture:  # per KV group: its queries, then its key and its value
            grouped = as_activations.view(1, fused.shape[1], hf_attention.num_kv_heads, -1, d)
            q, k, v = grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
        elif hf_attention.multi_query:
            q, k, v = fused_heads.split([heads, 1, 1], dim=-2)
        else:  # query, key and value interleaved per head
            q, k, v = fused_heads.unflatten(-2, (heads, 3)).unbind(-2)
    return tuple(t[0].permute(1, 2, 0) for t in (q, k, v))


@pytest.mark.parametrize(
    "name", ["gpt_neox-parallel", "falcon-new-gqa", "falcon-old-mqa-parallel", "falcon-old-mha-sequential-bias"]
)
def test_fused_qkv_gives_each_rank_its_heads(name: str, tiny_checkpoint) -> None:
    """Both ranks of TP=2 together hold transformers' q, k and v heads, in order (a lone KV head on each rank)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rayinfer.workers.parallel_state import set_tensor_parallel_group
    from rayinfer.workers.weight_loader import build_model

    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    spec = load_model_spec(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_attention = hf.base_model.layers[0].attention if arch == "gpt_neox" else hf.base_model.h[0].self_attention
    weights = load_file(str(model_dir / "model.safetensors"))
    fused_name = next(n for n in weights if ".0." in n and "query_key_value.weight" in n)
    expected = _hf_qkv_heads(name, weights[fused_name], hf_attention)
    d = spec.head_dim
    ranks = []
    try:
        for rank in (0, 1):
            set_tensor_parallel_group(rank, 2)
            model = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
            qkv = model.model.layers[0].self_attn.qkv_proj
            q, k, v = qkv.weight.detach().split([qkv.num_heads * d, qkv.num_kv_heads * d, qkv.num_kv_heads * d])
            ranks.append(tuple(part.view(-1, d, spec.hidden_size) for part in (q, k, v)))
    finally:
        set_tensor_parallel_group(0, 1)
    torch.testing.assert_close(torch.cat([ranks[0][0], ranks[1][0]]), expected[0], rtol=0, atol=0)
    for part in (1, 2):
        if spec.num_kv_heads == 1:  # replicated on both ranks
            for rank in ranks:
                torch.testing.assert_close(rank[part], expected[part], rtol=0, atol=0)
        else:
            torch.testing.assert_close(torch.cat([ranks[0][part], ranks[1][part]]), expected[part], rtol=0, atol=0)
    check_tensor_parallel(spec, 2)


@pytest.mark.parametrize("name", ["gpt_neox-parallel", "falcon-new-gqa"])
def test_tp2_on_ray_matches_transformers(name: str, greedy_matches_transformers, ray_session) -> None:
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(
        name, arch, overrides, ARCHITECTURES[arch], tensor_parallel_size=2, distributed_executor_backend="ray"
    )


@pytest.mark.parametrize(
    "name", ["gptj-partial", "phi-qk-layernorm-mha", "falcon-old-mqa-parallel", "falcon-alibi-mha-parallel-bias"]
)
def test_triton_kernels_match_transformers(
    name: str, tiny_checkpoint, hf_greedy, coverage_prompts, monkeypatch
) -> None:
    """The Triton kernels (the interpreter on CPU): interleaved partial rotary, LayerNorm with a bias (also over each
    head of q and k), neox partial rotary, MQA attention and ALiBi, as GPU runs use them."""
    from rayinfer.cluster import LLM, SamplingParams
    from rayinfer.kernels.triton_compat import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("Triton is not installed on this platform")
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)[:4]
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("num_heads", [4, 6, 12, 32, 71])
def test_alibi_slopes_are_transformers_bfloat16_slopes(num_heads: int) -> None:
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    from rayinfer.workers.layers.alibi import alibi_slopes

    bias = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), num_heads, torch.float32).view(num_heads, 3)
    torch.testing.assert_close(alibi_slopes(num_heads).bfloat16().float(), bias[:, 1], rtol=0, atol=0)


def test_alibi_changes_the_output(tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy) -> None:
    """The same weights with rotary positions instead of ALiBi give other tokens, so the test above sees ALiBi."""
    arch, overrides = CONFIGS["falcon-alibi-mha-parallel-bias"]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    rotary = tiny_checkpoint(arch, **{**overrides, "alibi": False})
    assert rayinfer_greedy(rotary, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


def test_alibi_slopes_split_with_the_heads(tiny_checkpoint) -> None:
    from rayinfer.workers.layers.alibi import alibi_slopes
    from rayinfer.workers.parallel_state import set_tensor_parallel_group
    from rayinfer.workers.weight_loader import build_model

    arch, overrides = CONFIGS["falcon-alibi-mha-parallel-bias"]
    model_dir = tiny_checkpoint(arch, **overrides)
    spec = load_model_spec(model_dir)
    per_rank = []
    try:
        for rank in (0, 1):
            set_tensor_parallel_group(rank, 2)
            model = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64)
            per_rank.append(model.model.layers[0].self_attn.attn.alibi_slopes)
    finally:
        set_tensor_parallel_group(0, 1)
    expected = alibi_slopes(spec.num_heads).bfloat16().float() * spec.head_dim**-0.5
    torch.testing.assert_close(torch.cat(per_rank), expected, rtol=0, atol=0)
