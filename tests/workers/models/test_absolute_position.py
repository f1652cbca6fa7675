"""GPT-2, GPT-BigCode, OPT and Bloom: greedy output equals transformers' generate(do_sample=False) token for token
(float32), with chunked prefill splitting the prompts, plus the pieces peculiar to each family (Conv1D weights,
fused q/k/v layouts, learned positions with OPT's offset, post-norm, project_in/out, ALiBi) and their
tensor-parallel split."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayinfer.kernels.triton_compat import HAS_TRITON
from rayinfer.workers import weight_loader
from rayinfer.workers.layers.alibi import alibi_slopes, rank_alibi_slopes
from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec
from rayinfer.workers.parallel_state import set_tensor_parallel_group

NEW_TOKENS = 24

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
}

# GPT-2 with every attention-scale option: scores scaled by head_dim ** -0.5 / (layer + 1), the reordered float32
# path of transformers' eager attention, an explicit n_inner, erf GELU and an untied head.
GPT2_LAYER_SCALED = {
    "tie_word_embeddings": False, "n_inner": 96, "scale_attn_by_inverse_layer_idx": True,
    "reorder_and_upcast_attn": True, "activation_function": "gelu",
}
# 5 heads: not a power of two, so the last head takes a slope from the second ALiBi series.
BLOOM_ODD_HEADS = {"hidden_size": 60, "n_head": 5}
# seed 1: the default seed's weights happen to loop in one continuation.
BLOOM_RESIDUAL_POST_LN = {"apply_residual_connection_post_layernorm": True, "tie_word_embeddings": False, "seed": 1}
OPT_POST_NORM = {"do_layer_norm_before": False}

CONFIGS = {
    # Default GPT-2: tied head, n_inner None (4 * hidden), gelu_new, head_dim ** -0.5.
    "gpt2-tied": ("gpt2", {}),
    "gpt2-untied-layer-scaled": ("gpt2", GPT2_LAYER_SCALED),
    "gpt2-unscaled-relu": ("gpt2", {"scale_attn_weights": False, "activation_function": "relu"}),
    # multi_query: one K/V head after all of q in c_attn; without it c_attn is laid out per head.
    "gpt_bigcode-mqa-tied": ("gpt_bigcode", {}),
    "gpt_bigcode-mha-untied": ("gpt_bigcode", {"multi_query": False, "tie_word_embeddings": False}),
    "opt-pre-norm-tied": ("opt", {}),
    "opt-post-norm": ("opt", OPT_POST_NORM),
    "opt-project-in-out": ("opt", {"word_embed_proj_dim": 32}),
    "opt-no-bias-no-affine-untied": (
        "opt", {"enable_bias": False, "layer_norm_elementwise_affine": False, "tie_word_embeddings": False}
    ),
    "bloom-odd-heads-tied": ("bloom", BLOOM_ODD_HEADS),
    "bloom-residual-post-ln-untied": ("bloom", BLOOM_RESIDUAL_POST_LN),
}


def _attn_implementation(overrides: dict) -> str | None:
    # transformers takes GPT-2's reordered, upcast attention path only in eager mode.
    return "eager" if overrides.get("reorder_and_upcast_attn") else None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, greedy_matches_transformers) -> None:
    arch, overrides = CONFIGS[name]
    attn = _attn_implementation(overrides)
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch], attn_implementation=attn)


# Mutation checks: the same weights with one peculiarity switched off give other tokens, so the test above sees it.
MUTATIONS = {
    "gpt2-no-layer-scale": ("gpt2", GPT2_LAYER_SCALED, {"scale_attn_by_inverse_layer_idx": False}),
    "bloom-residual-before-ln": ("bloom", BLOOM_RESIDUAL_POST_LN, {"apply_residual_connection_post_layernorm": False}),
    # Same tensors (no final norm either way), but pre-norm blocks.
    "opt-pre-norm": ("opt", OPT_POST_NORM, {"do_layer_norm_before": True, "_remove_final_layer_norm": True}),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_peculiarities_change_the_output(
    name: str, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy
) -> None:
    arch, overrides, mutation = MUTATIONS[name]
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS, attn_implementation=_attn_implementation(overrides))
    mutated = tiny_checkpoint(arch, **{**overrides, **mutation})
    assert rayinfer_greedy(mutated, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


def test_specs_read_each_family_config(tiny_checkpoint) -> None:
    gpt2 = load_model_spec(tiny_checkpoint("gpt2"))
    assert (gpt2.hidden_size, gpt2.num_heads, gpt2.num_layers) == (64, 4, 2)
    assert (gpt2.intermediate_size, gpt2.num_kv_heads, gpt2.max_position_embeddings) == (256, 4, 512)  # n_inner None
    assert gpt2.tie_word_embeddings
    assert load_model_spec(tiny_checkpoint("gpt2", **GPT2_LAYER_SCALED)).intermediate_size == 96
    assert load_model_spec(tiny_checkpoint("gpt_bigcode")).num_kv_heads == 1
    assert load_model_spec(tiny_checkpoint("gpt_bigcode", multi_query=False)).num_kv_heads == 4
    opt = load_model_spec(tiny_checkpoint("opt"))
    assert (opt.intermediate_size, opt.num_kv_heads, opt.max_position_embeddings) == (128, 4, 512)
    bloom = load_model_spec(tiny_checkpoint("bloom", **BLOOM_ODD_HEADS))
    assert (bloom.hidden_size, bloom.num_heads, bloom.head_dim, bloom.intermediate_size) == (60, 5, 12, 240)


def test_bloom_legacy_n_embed_key_wins(tiny_checkpoint, tmp_path: Path) -> None:
    model_dir = tmp_path / "bloom"
    shutil.copytree(tiny_checkpoint("bloom"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["n_embed"] = config.pop("hidden_size")  # as bigscience/bloom-* configs spell it
    (model_dir / "config.json").write_text(json.dumps(config))
    assert load_model_spec(model_dir).hidden_size == 64


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 112])
def test_alibi_slopes_equal_transformers(num_heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # build_alibi_tensor gives slope * position: position 1 of a two-token mask is each head's slope.
    expected = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(num_heads), expected, rtol=0, atol=0)


def test_alibi_slopes_change_the_output(
    tiny_checkpoint, coverage_prompts, rayinfer_greedy, hf_greedy, monkeypatch
) -> None:
    """ALiBi is the only position signal Bloom has: slopes of the wrong heads give other tokens."""
    from rayinfer.workers.models import bloom

    model_dir = tiny_checkpoint("bloom", **BLOOM_ODD_HEADS)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    monkeypatch.setattr(bloom, "rank_alibi_slopes", lambda heads, rank, size: alibi_slopes(heads).flip(0))
    assert rayinfer_greedy(model_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


# --- checkpoint names -------------------------------------------------------------------------------------------------


def _rewrite_checkpoint(source: Path, target: Path, rename, extra: dict[str, torch.Tensor]) -> None:
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    renamed = {rename(name): tensor for name, tensor in tensors.items()}
    save_file({**renamed, **extra}, str(target / "model.safetensors"))


def _causal_mask_buffers(layers: int) -> dict[str, torch.Tensor]:
    """The fixed mask buffers older GPT-2 checkpoints carry per layer (not weights: the loader must skip them)."""
    mask = torch.tril(torch.ones(512, 512, dtype=torch.bool)).view(1, 1, 512, 512)
    out = {}
    for i in range(layers):
        out[f"h.{i}.attn.bias"] = mask.clone()
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


NAME_VARIANTS = {
    # gpt2 / bloom hub checkpoints hold the base model's names (no `transformer.`), GPT-2's with mask buffers.
    "gpt2-no-prefix-with-mask-buffers": ("gpt2", GPT2_LAYER_SCALED, lambda n: n.removeprefix("transformer."), True),
    "bloom-no-prefix": ("bloom", BLOOM_RESIDUAL_POST_LN, lambda n: n.removeprefix("transformer."), False),
    # facebook/opt-* checkpoints name the decoder without the `model.` prefix.
    "opt-decoder-prefix": ("opt", {"word_embed_proj_dim": 32}, lambda n: n.removeprefix("model."), False),
}


@pytest.mark.parametrize("name", list(NAME_VARIANTS))
def test_checkpoint_name_variants_load_the_same_model(
    name: str, tiny_checkpoint, coverage_prompts, rayinfer_greedy, tmp_path: Path
) -> None:
    arch, overrides, rename, mask_buffers = NAME_VARIANTS[name]
    source = tiny_checkpoint(arch, **overrides)
    target = tmp_path / name
    extra = _causal_mask_buffers(2) if mask_buffers else {}
    _rewrite_checkpoint(source, target, rename, extra)
    names = load_file(str(target / "model.safetensors")).keys()
    assert not any(n.startswith(("transformer.", "model.")) for n in names)
    prompts = coverage_prompts(source)[:3]
    expected = rayinfer_greedy(source, prompts, 8)
    assert rayinfer_greedy(target, prompts, 8) == expected


def test_unknown_checkpoint_tensor_is_still_refused(tiny_checkpoint, tmp_path: Path) -> None:
    """Ignoring GPT-2's attn.bias buffer must not swallow real tensors such as c_attn's bias."""
    target = tmp_path / "gpt2"
    extra = {"transformer.h.0.attn.q_attn.weight": torch.ones(2)}
    _rewrite_checkpoint(tiny_checkpoint("gpt2"), target, lambda n: n, extra)
    spec = load_model_spec(target)
    with pytest.raises(ValueError, match="does not use.*q_attn"):
        weight_loader.build_model(spec, target, torch.float32, torch.device("cpu"), 64)


# --- bad configs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides", "match"),
    [
        ("gpt2", {"activation_function": "swish"}, "activation_function 'swish' is not supported"),
        ("opt", {"activation_function": "tanh"}, "activation_function 'tanh' is not supported"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ],
    ids=["gpt2-activation", "opt-activation", "gpt2-cross-attention"],
)
def test_unsupported_configs_are_refused_naming_the_field(arch, overrides, match, tiny_checkpoint, tmp_path) -> None:
    model_dir = tmp_path / arch
    shutil.copytree(tiny_checkpoint(arch), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(overrides)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        weight_loader.build_model(load_model_spec(model_dir), model_dir, torch.float32, torch.device("cpu"), 64)


# --- tensor parallelism -----------------------------------------------------------------------------------------------


def test_check_tensor_parallel_allows_and_refuses(tiny_checkpoint) -> None:
    for arch, overrides in [("gpt2", {}), ("gpt_bigcode", {}), ("gpt_bigcode", {"multi_query": False}), ("opt", {})]:
        check_tensor_parallel(load_model_spec(tiny_checkpoint(arch, **overrides)), 2)
    check_tensor_parallel(load_model_spec(tiny_checkpoint("bloom")), 4)
    odd = load_model_spec(tiny_checkpoint("bloom", **BLOOM_ODD_HEADS))
    with pytest.raises(ValueError, match=r"cannot split this model: num_attention_heads \(5\)"):
        check_tensor_parallel(odd, 2)


@pytest.fixture
def rank_one_of_two():
    set_tensor_parallel_group(1, 2)
    yield
    set_tensor_parallel_group(0, 1)


def _full_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _build(model_dir: Path) -> torch.nn.Module:
    return weight_loader.build_model(load_model_spec(model_dir), model_dir, torch.float32, torch.device("cpu"), 64)


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_gpt2_rank_takes_its_heads_from_the_transposed_fused_c_attn(tiny_checkpoint, rank_one_of_two) -> None:
    model_dir = tiny_checkpoint("gpt2", **GPT2_LAYER_SCALED)
    full = _full_tensors(model_dir)
    layer = _build(model_dir).model.layers[0]
    c_attn = full["transformer.h.0.attn.c_attn.weight"].t()  # Conv1D [in, out] -> [out, in]: q, k, v row blocks
    hidden, half = 64, 32
    q, k, v = c_attn.split(hidden)
    _exact(layer.self_attn.qkv_proj.weight, torch.cat([q[half:], k[half:], v[half:]]))
    bias_q, bias_k, bias_v = full["transformer.h.0.attn.c_attn.bias"].split(hidden)
    _exact(layer.self_attn.qkv_proj.bias, torch.cat([bias_q[half:], bias_k[half:], bias_v[half:]]))
    # Row-parallel c_proj: rank 1 takes the second half of the input features (rows of the [in, out] tensor).
    _exact(layer.self_attn.o_proj.weight, full["transformer.h.0.attn.c_proj.weight"][half:].t())
    _exact(layer.mlp.fc.weight, full["transformer.h.0.mlp.c_fc.weight"].t()[48:])  # n_inner 96 over 2 ranks
    _exact(layer.mlp.proj.weight, full["transformer.h.0.mlp.c_proj.weight"][48:].t())


def test_gpt_bigcode_ranks_split_queries_and_share_the_kv_head(tiny_checkpoint, rank_one_of_two) -> None:
    model_dir = tiny_checkpoint("gpt_bigcode")
    full = _full_tensors(model_dir)
    qkv = _build(model_dir).model.layers[0].self_attn.qkv_proj
    assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
    q, k, v = full["transformer.h.0.attn.c_attn.weight"].split([64, 16, 16])
    _exact(qkv.weight, torch.cat([q[32:], k, v]))  # the single K/V head is replicated


def test_per_head_qkv_rank_takes_a_block_of_heads(tiny_checkpoint, rank_one_of_two) -> None:
    """Bloom and multi-head BigCode lay q/k/v out per head ([heads, 3, head_dim]): rank 1 holds heads 2 and 3
    and the ALiBi slopes of those heads."""
    fused = {"bloom": "transformer.h.0.self_attention.query_key_value", "gpt_bigcode": "transformer.h.0.attn.c_attn"}
    for arch, name in fused.items():
        model_dir = tiny_checkpoint(arch, **({"multi_query": False} if arch == "gpt_bigcode" else {}))
        full = _full_tensors(model_dir)
        attn = _build(model_dir).model.layers[0].self_attn
        per_head = full[f"{name}.weight"].view(4, 3, 16, 64)
        # Stored as this rank's [q | k | v]: heads 2 and 3 of each, picked out of the interleaved rows.
        _exact(attn.qkv_proj.weight, torch.cat([per_head[2:, part].reshape(-1, 64) for part in range(3)]))
        q, k, v = attn.qkv_proj.split(torch.arange(96.0).view(1, 96))
        _exact(q, torch.arange(32.0).view(1, 32))
        _exact(k, q + 32)
        _exact(v, q + 64)
        if arch == "bloom":
            _exact(attn.attn.alibi_slopes, alibi_slopes(4)[2:])


def test_rank_alibi_slopes_cover_every_head_once() -> None:
    parts = [rank_alibi_slopes(6, rank, 3) for rank in range(3)]
    _exact(torch.cat(parts), alibi_slopes(6))


def test_opt_rank_splits_q_k_v_and_replicates_projections(tiny_checkpoint, rank_one_of_two) -> None:
    model_dir = tiny_checkpoint("opt", word_embed_proj_dim=32)
    full = _full_tensors(model_dir)
    model = _build(model_dir).model
    prefix = "model.decoder.layers.0.self_attn"
    expected = torch.cat([full[f"{prefix}.{p}_proj.weight"][32:] for p in "qkv"])
    _exact(model.layers[0].self_attn.qkv_proj.weight, expected)
    _exact(model.project_in.weight, full["model.decoder.project_in.weight"])
    _exact(model.embed_positions.weight, full["model.decoder.embed_positions.weight"])
    assert model.embed_positions.max_positions == 512  # the table has 2 extra leading rows


# One Ray run per family: two tensor-parallel workers on CPU (gloo) give transformers' tokens.
TP_CONFIGS = {
    "gpt2-untied-layer-scaled": ("gpt2", GPT2_LAYER_SCALED),
    "gpt_bigcode-mqa-tied": ("gpt_bigcode", {}),
    "opt-project-in-out": ("opt", {"word_embed_proj_dim": 32}),
    # 6 heads: rank 1's heads 3..5 take slopes from both ALiBi series.
    "bloom-six-heads-untied": ("bloom", {"hidden_size": 96, "n_head": 6, "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", list(TP_CONFIGS))
def test_tensor_parallel_matches_transformers(name: str, greedy_matches_transformers, ray_session) -> None:
    arch, overrides = TP_CONFIGS[name]
    on_ray = dict(tensor_parallel_size=2, distributed_executor_backend="ray")
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch], _attn_implementation(overrides), **on_ray)


# --- Triton kernels ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("bloom", BLOOM_ODD_HEADS), ("opt", OPT_POST_NORM)],
    ids=["bloom-alibi-odd-heads", "opt-post-norm"],
)
def test_triton_kernels_match_transformers(
    arch, overrides, tiny_checkpoint, coverage_prompts, hf_greedy, monkeypatch
) -> None:
    """The Triton LayerNorm and paged attention with ALiBi slopes (the interpreter runs them on CPU)."""
    from rayinfer.cluster import LLM, SamplingParams

    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)[2:5]
    new_tokens = 12
    # An 8-token budget with 4-token blocks: prompts split over steps, chunks cross block edges, decodes mix in.
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompts, new_tokens)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
