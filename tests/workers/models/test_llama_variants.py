"""Phi-3, Starcoder2, OLMo, StableLM and Cohere: greedy output equals transformers' generate(do_sample=False)
token for token (float32), with chunked prefill splitting the prompts, plus the pieces peculiar to each family
(fused checkpoint tensors, LayerNorm variants, clip_qkv, per-head q/k norms, parallel residuals, interleaved
rotary, logit_scale), their tensor-parallel sharding and the configs they refuse."""
from __future__ import annotations

import json

import pytest
import torch

from rayinfer.kernels.triton_compat import HAS_TRITON
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
    "starcoder2-mqa-nobias-erf-gelu": (
        "starcoder2", {"num_key_value_heads": 1, "use_bias": False, "hidden_act": "gelu"}
    ),
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
def test_greedy_matches_transformers(name: str, greedy_matches_transformers) -> None:
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch])


def _build(model_dir, max_len: int = 64):
    from rayinfer.workers.weight_loader import build_model

    return build_model(load_model_spec(model_dir), model_dir, torch.float32, torch.device("cpu"), max_len)


def test_specs_read_each_familys_keys(tiny_checkpoint) -> None:
    # The tiny builder writes no rms_norm_eps for the LayerNorm families: their own eps keys are read.
    starcoder2 = load_model_spec(tiny_checkpoint("starcoder2", sliding_window=WINDOW))
    assert starcoder2.rms_norm_eps == 1e-5 and starcoder2.sliding_windows == (WINDOW, WINDOW)
    assert (starcoder2.qkv_bias, starcoder2.o_bias, starcoder2.mlp_bias) == (True, True, True)
    nobias = load_model_spec(tiny_checkpoint("starcoder2", num_key_value_heads=1, use_bias=False, hidden_act="gelu"))
    assert (nobias.qkv_bias, nobias.o_bias, nobias.mlp_bias) == (False, False, False)
    stablelm = load_model_spec(tiny_checkpoint("stablelm", qk_layernorm=True, use_qkv_bias=True, layer_norm_eps=1e-4))
    assert stablelm.rms_norm_eps == 1e-4 and stablelm.rope.rot_dim == stablelm.head_dim // 4  # default factor 0.25
    model = _build(tiny_checkpoint("stablelm", qk_layernorm=True, use_qkv_bias=True))
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None  # use_qkv_bias: q/k/v only
    assert load_model_spec(tiny_checkpoint("olmo", clip_qkv=CLIP_QKV)).rms_norm_eps == 1e-5  # fixed in transformers
    phi3 = load_model_spec(tiny_checkpoint("phi3", num_key_value_heads=1, sliding_window=WINDOW,
                                           partial_rotary_factor=0.5, tie_word_embeddings=True))
    assert phi3.rope.rot_dim == phi3.head_dim // 2 and phi3.sliding_windows == (WINDOW, WINDOW)


def test_cohere_logit_scale_multiplies_the_logits(tiny_checkpoint) -> None:
    """A positive scale keeps the argmax (greedy tokens cannot show it): compare logits, which sampling sees."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_checkpoint("cohere", logit_scale=0.3)
    ours = _build(model_dir)
    assert ours.logit_scale == 0.3
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden = torch.randn(3, ours.spec.hidden_size)
    with torch.inference_mode():
        expected = hf.lm_head(hidden) * 0.3
        torch.testing.assert_close(ours.compute_logits(hidden), expected)
        assert not torch.allclose(ours.compute_logits(hidden), hf.lm_head(hidden))  # the scale is really applied


def test_per_head_norms_equal_transformers_modules() -> None:
    """StableLM keeps one LayerNorm per head, Cohere one [heads, head_dim] weight: each head has its own row."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    from rayinfer.workers.layers.layernorm_variants import PerHeadLayerNorm

    class Stored:  # a checkpoint tensor as the loaders see it
        def __init__(self, name: str, tensor: torch.Tensor) -> None:
            self.name, self.tensor, self.shape = name, tensor, tuple(tensor.shape)

        def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
            return self.tensor.narrow(dim, start, length)

        def full(self) -> torch.Tensor:
            return self.tensor

    heads, head_dim, tokens = 3, 8, 5
    weight = torch.randn(heads, head_dim)
    ours = PerHeadLayerNorm(heads, head_dim, 1e-5)
    ours.weight.weight_loader(ours.weight, Stored("self_attn.q_norm.weight", weight))  # Cohere: one tensor
    per_head = PerHeadLayerNorm(heads, head_dim, 1e-5)
    for h in (2, 0):
        per_head.weight.weight_loader(per_head.weight, Stored(f"q_layernorm.norms.{h}.weight", weight[h]))
    x = torch.randn(tokens, heads * head_dim)
    with pytest.raises(ValueError, match=r"no norm weight for heads \[1\]"):
        per_head(x)  # StableLM: a head's tensor is missing
    per_head.weight.weight_loader(per_head.weight, Stored("q_layernorm.norms.1.weight", weight[1]))
    torch.testing.assert_close(per_head.weight, weight, rtol=0, atol=0)
    stablelm = StableLmLayerNormPerHead(head_dim, heads, eps=1e-5)
    for h, norm in enumerate(stablelm.norms):
        norm.weight.data.copy_(weight[h])
    cohere = CohereLayerNorm((heads, head_dim), eps=1e-5)
    cohere.weight.data.copy_(weight)
    with torch.no_grad():
        by_stablelm = stablelm(x.view(1, tokens, heads, head_dim).transpose(1, 2)).transpose(1, 2).reshape(tokens, -1)
        by_cohere = cohere(x.view(tokens, heads, head_dim)).reshape(tokens, -1)
        torch.testing.assert_close(ours(x), by_stablelm)
        torch.testing.assert_close(ours(x), by_cohere)


# Mutation checks: the same weights with one peculiarity switched off give other tokens, so the tests above see it.
MUTATIONS = {
    "phi3-no-window": ("phi3-mqa-window-partial-tied", {"sliding_window": None}),
    "phi3-full-rotary": ("phi3-mqa-window-partial-tied", {"partial_rotary_factor": 1.0}),
    "starcoder2-no-window": ("starcoder2-gqa-window", {"sliding_window": None}),
    "olmo-no-clip": ("olmo-gqa-clip", {"clip_qkv": None}),
    "stablelm-full-rotary": ("stablelm-parallel-mqa-tied", {"partial_rotary_factor": 1.0}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_peculiarities_change_the_output(
    mutation: str, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy
) -> None:
    name, change = MUTATIONS[mutation]
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    mutated = tiny_checkpoint(arch, **{**overrides, **change})
    assert rayinfer_greedy(mutated, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


def test_cohere_interleaved_rotary_is_seen(
    tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy, monkeypatch
) -> None:
    """Rotating Llama's half-split pairs instead of Cohere's interleaved ones changes the tokens."""
    from rayinfer.workers.models.cohere import CohereAttention

    arch, overrides = CONFIGS["cohere-gqa-untied"]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    monkeypatch.setattr(CohereAttention, "rotary_is_neox", True)
    assert rayinfer_greedy(model_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


def test_bad_configs_are_refused_by_name(tiny_checkpoint, tmp_path) -> None:
    import shutil

    def edited(arch: str, **changes) -> object:
        folder = tmp_path / f"{arch}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_checkpoint(arch), folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ValueError, match=r"rope_scaling \(rope_parameters\) type 'longrope'"):
        load_model_spec(edited("phi3", rope_parameters={**longrope, "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match=r"rope_scaling \(rope_scaling\) type 'su'"):
        legacy = {"type": "su", "short_factor": longrope["short_factor"], "long_factor": longrope["long_factor"]}
        load_model_spec(edited("phi3", rope_parameters=None, rope_scaling=legacy))
    with pytest.raises(ValueError, match="hidden_act 'swiglu' is not supported"):
        _build(edited("starcoder2", hidden_act="swiglu"))


def _rank_of_two(model_dir, rank: int):
    from rayinfer.workers.parallel_state import set_tensor_parallel_group

    set_tensor_parallel_group(rank, 2)
    try:
        return _build(model_dir)
    finally:
        set_tensor_parallel_group(0, 1)


def _half(t: torch.Tensor, rank: int, split: bool = True) -> torch.Tensor:
    return t.chunk(2)[rank] if split else t


SHARDED = {
    "phi3-gqa": ("phi3", CONFIGS["phi3-gqa"][1]),
    "phi3-mqa": ("phi3", CONFIGS["phi3-mqa-window-partial-tied"][1]),
    "stablelm-qknorm-gqa": ("stablelm", CONFIGS["stablelm-sequential-qknorm-bias"][1]),
    "stablelm-qknorm-mqa": (
        "stablelm", {"qk_layernorm": True, "num_key_value_heads": 1, "use_parallel_residual": True}
    ),
    "cohere-qknorm-gqa": ("cohere", CONFIGS["cohere-qknorm-tied-bias"][1]),
    "starcoder2-bias": ("starcoder2", CONFIGS["starcoder2-gqa-window"][1]),
    "olmo-clip": ("olmo", CONFIGS["olmo-gqa-clip"][1]),
}


@pytest.mark.parametrize("name", list(SHARDED))
def test_each_rank_of_two_holds_its_heads(name: str, tiny_checkpoint) -> None:
    """Tensor parallelism 2: every rank's packed and per-head parameters are its slices of the whole model's
    (fused Phi-3 tensors cut per part, per-head norm rows of its heads, a replicated single KV head whole)."""
    arch, overrides = SHARDED[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    spec = load_model_spec(model_dir)
    check_tensor_parallel(spec, 2)
    whole = _build(model_dir).model.layers[1]
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    kv_split = spec.num_kv_heads >= 2
    w_qkv = whole.self_attn.qkv_proj.weight
    q, k, v = w_qkv.split([q_rows, kv_rows, kv_rows])
    for rank in (0, 1):
        layer = _rank_of_two(model_dir, rank).model.layers[1]
        attn = layer.self_attn
        expected = torch.cat([_half(q, rank), _half(k, rank, kv_split), _half(v, rank, kv_split)])
        torch.testing.assert_close(attn.qkv_proj.weight, expected, rtol=0, atol=0)
        o_columns = whole.self_attn.o_proj.weight.chunk(2, dim=1)[rank]
        torch.testing.assert_close(attn.o_proj.weight, o_columns, rtol=0, atol=0)
        if hasattr(layer.mlp, "gate_up_proj"):
            gate, up = whole.mlp.gate_up_proj.weight.chunk(2)
            expected = torch.cat([_half(gate, rank), _half(up, rank)])
            torch.testing.assert_close(layer.mlp.gate_up_proj.weight, expected, rtol=0, atol=0)
        else:  # Starcoder2's c_fc: column split, bias too
            torch.testing.assert_close(layer.mlp.fc.bias, _half(whole.mlp.fc.bias, rank), rtol=0, atol=0)
        if getattr(attn, "qk_norm_names", None) is not None:
            q_name, k_name = attn.qk_norm_names
            q_norm, k_norm = getattr(whole.self_attn, q_name).weight, getattr(whole.self_attn, k_name).weight
            assert not torch.equal(q_norm[0], q_norm[1])  # per-head rows really differ
            torch.testing.assert_close(getattr(attn, q_name).weight, _half(q_norm, rank), rtol=0, atol=0)
            torch.testing.assert_close(getattr(attn, k_name).weight, _half(k_norm, rank, kv_split), rtol=0, atol=0)


# Each family's tensor-parallel peculiarity, run for real on two Ray workers (gloo on CPU).
TP2_CONFIGS = ["phi3-mqa-window-partial-tied", "stablelm-sequential-qknorm-bias", "cohere-qknorm-tied-bias",
               "starcoder2-gqa-window", "olmo-gqa-clip"]


@pytest.mark.parametrize("name", TP2_CONFIGS)
def test_tensor_parallel_two_matches_transformers(name: str, greedy_matches_transformers, ray_session) -> None:
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(
        name, arch, overrides, ARCHITECTURES[arch], tensor_parallel_size=2, distributed_executor_backend="ray"
    )


# The Triton kernels these families add to Llama's (LayerNorm with and without bias, per-head LayerNorm, GPT-J
# rotary, partial rotary), forced on (the interpreter runs them on CPU; a GPU runs them compiled).
TRITON_CONFIGS = ["cohere-qknorm-tied-bias", "stablelm-sequential-qknorm-bias", "olmo-gqa-clip"]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
@pytest.mark.parametrize("name", TRITON_CONFIGS)
def test_triton_kernels_match_transformers(
    name: str, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy, monkeypatch
) -> None:
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    arch, overrides = CONFIGS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)[:3]
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert rayinfer_greedy(model_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) == reference
