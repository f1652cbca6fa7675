"""Qwen2-MoE and Mixtral: greedy output equals transformers' generate(do_sample=False) token for token (float32),
with chunked prefill splitting the prompts, on one process, on the Triton kernels and across two tensor-parallel
Ray workers; plus routing, checkpoint layouts and the configs each family reads."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayinfer.kernels.triton_compat import HAS_TRITON
from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

NEW_TOKENS = 24

ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# The tiny builder's MoE defaults: 4 experts, top-2; Qwen2-MoE with routed experts of 32, a shared expert of 64 and
# dense MLPs of 128; Mixtral with experts of 64. GQA 4:2 from the size preset; all untied.
QWEN2_MOE_WINDOW = dict(  # layer 0 slides over 8 tokens and is dense (step 2); layer 1 is sparse, full attention
    norm_topk_prob=True, decoder_sparse_step=2, num_key_value_heads=1,
    use_sliding_window=True, sliding_window=8, max_window_layers=2,
)
MIXTRAL_WINDOW = dict(sliding_window=8, num_key_value_heads=1)
CONFIGS = {
    # every layer sparse, shared expert, qkv bias, routing weights not renormalised
    "qwen2_moe-gqa": ("qwen2_moe", {}),
    "qwen2_moe-mqa-normtopk-step2-window": ("qwen2_moe", QWEN2_MOE_WINDOW),
    "qwen2_moe-mlp-only-layer": ("qwen2_moe", {"mlp_only_layers": [1]}),  # layer 1 dense by list
    "mixtral-gqa": ("mixtral", {}),
    "mixtral-mqa-window": ("mixtral", MIXTRAL_WINDOW),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name: str, greedy_matches_transformers) -> None:
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(name, arch, overrides, ARCHITECTURES[arch])


def test_models_are_built_as_configured(tiny_checkpoint) -> None:
    from rayinfer.workers.layers.moe import FusedMoE
    from rayinfer.workers.models.llama import LlamaMLP
    from rayinfer.workers.weight_loader import build_model

    def built(arch: str, **overrides):
        model_dir = tiny_checkpoint(arch, **overrides)
        return build_model(load_model_spec(model_dir), model_dir, torch.float32, torch.device("cpu"), max_len=64)

    layers = built("qwen2_moe", **QWEN2_MOE_WINDOW).model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["LlamaMLP", "Qwen2MoeSparseBlock"]
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [8, None]
    sparse = layers[1].mlp
    assert sparse.renormalize and sparse.top_k == 2 and isinstance(sparse.experts, FusedMoE)
    assert tuple(sparse.experts.gate_up_proj.weight.shape) == (4, 2 * 32, 64)
    assert tuple(sparse.experts.down_proj.weight.shape) == (4, 64, 32)
    assert isinstance(sparse.shared_expert, LlamaMLP) and sparse.shared_expert.down_proj.weight.shape[1] == 64
    attn = layers[1].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None  # Qwen2-MoE: qkv bias, none on o_proj
    layers = built("qwen2_moe", mlp_only_layers=[1]).model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["Qwen2MoeSparseBlock", "LlamaMLP"]
    assert not layers[0].mlp.renormalize
    layers = built("mixtral", **MIXTRAL_WINDOW).model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [8, 8]
    assert all(type(layer.mlp).__name__ == "MixtralSparseBlock" for layer in layers)
    assert layers[0].self_attn.qkv_proj.bias is None
    assert [layer.self_attn.attn.sliding_window for layer in built("mixtral").model.layers] == [None, None]


def _router_choices(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' top-2 expert ids of every prompt token, per sparse layer ([tokens, 2] each)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per_layer: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), output_router_logits=True)
            for i, logits in enumerate(out.router_logits):
                if len(per_layer) <= i:
                    per_layer.append([])
                per_layer[i].append(torch.topk(logits, 2, dim=-1).indices)
    return [torch.cat(chunks) for chunks in per_layer]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_routing_is_not_trivial(arch: str, tiny_checkpoint, coverage_prompts) -> None:
    """Different tokens pick different experts: every expert serves some tokens, no expert pair serves them all."""
    model_dir = tiny_checkpoint(arch)
    choices = _router_choices(model_dir, coverage_prompts(model_dir))
    assert len(choices) == 2  # both layers are sparse
    for ids in choices:
        assert set(ids.flatten().tolist()) == {0, 1, 2, 3}
        pairs = {tuple(sorted(row)) for row in ids.tolist()}
        assert len(pairs) >= 4, pairs
        assert max(int((ids == e).any(dim=-1).sum()) for e in range(4)) < ids.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing_equals_transformers_routers(dtype: torch.dtype) -> None:
    """Weights and ids equal transformers' routers: Mixtral always renormalises and keeps float32 weights;
    Qwen2-MoE renormalises only with norm_topk_prob and casts the weights to the activations' dtype."""
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    from rayinfer.workers.layers.moe import route_top_k

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen).to(dtype)
    weight = torch.randn(6, 16, generator=gen).to(dtype)
    logits = torch.nn.functional.linear(hidden, weight)
    routers = [
        (MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=3)), True, False),
        *(
            (Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=n)),
             n, True)
            for n in (False, True)
        ),
    ]
    for router, renormalize, cast in routers:
        router.weight.data = weight.clone()
        _, hf_weights, hf_ids = router(hidden)
        weights, ids = route_top_k(logits, 3, renormalize)
        if cast:
            weights = weights.to(dtype)
        assert torch.equal(ids, hf_ids)
        assert weights.dtype == hf_weights.dtype and torch.equal(weights, hf_weights)


# Mutation checks: the same weights with one peculiarity switched off give other tokens, so the tests above see it.
@pytest.mark.parametrize(
    ("arch", "overrides", "mutation"),
    [
        ("qwen2_moe", {}, {"norm_topk_prob": True}),
        ("qwen2_moe", QWEN2_MOE_WINDOW, {"use_sliding_window": False}),
        ("mixtral", MIXTRAL_WINDOW, {"sliding_window": None}),
    ],
    ids=["qwen2_moe-renormalised", "qwen2_moe-no-window", "mixtral-no-window"],
)
def test_peculiarities_change_the_output(
    arch: str, overrides: dict, mutation: dict, tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy
) -> None:
    model_dir = tiny_checkpoint(arch, **overrides)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    mutated = tiny_checkpoint(arch, **{**overrides, **mutation})
    assert rayinfer_greedy(mutated, prompts, NEW_TOKENS, max_num_batched_tokens=16) != reference


def _write_fused_layout(source: Path, target: Path) -> None:
    """The checkpoint rewritten in transformers 5's in-memory layout: per layer, experts.gate_up_proj [E, 2I, H]
    (gate rows first) and experts.down_proj [E, H, I], no `.weight` suffix, and the MoE block named `mlp`."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    fused = {}
    for name, tensor in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        prefix, sep, rest = name.partition(".mlp.experts.")
        if not sep:
            fused[name] = tensor
            continue
        expert, proj, _ = rest.split(".")
        experts.setdefault(prefix, {}).setdefault(names[proj], {})[int(expert)] = tensor
    for prefix, parts in experts.items():
        stack = {role: torch.stack([by_expert[e] for e in sorted(by_expert)]) for role, by_expert in parts.items()}
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1).contiguous()
        fused[f"{prefix}.mlp.experts.down_proj"] = stack["down"].contiguous()
    save_file(fused, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fused_expert_layout_loads_the_same_weights(arch: str, tiny_checkpoint, tmp_path: Path) -> None:
    """transformers 5 writes the hub's per-expert names (what the tests above load); its own fused layout loads too."""
    from rayinfer.workers.weight_loader import build_model

    model_dir = tiny_checkpoint(arch)
    names = load_file(str(model_dir / "model.safetensors")).keys()
    assert any(".experts.3." in name for name in names)  # what save_pretrained wrote: per-expert tensors
    fused_dir = tmp_path / "fused"
    _write_fused_layout(model_dir, fused_dir)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(fused_dir / "model.safetensors"))
    spec = load_model_spec(model_dir)
    per_expert = build_model(spec, model_dir, torch.float32, torch.device("cpu"), max_len=64).state_dict()
    fused = build_model(spec, fused_dir, torch.float32, torch.device("cpu"), max_len=64).state_dict()
    assert per_expert.keys() == fused.keys()
    assert all(torch.equal(per_expert[name], fused[name]) for name in per_expert)


def test_bad_configs_fail_with_clear_errors(tiny_checkpoint) -> None:
    from rayinfer.workers.models.mixtral import MixtralForCausalLM
    from rayinfer.workers.models.qwen2_moe import Qwen2MoeForCausalLM

    spec = load_model_spec(tiny_checkpoint("mixtral"))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        MixtralForCausalLM(dataclasses.replace(spec, hidden_act="gelu"), 64)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MixtralForCausalLM(dataclasses.replace(spec, raw={**spec.raw, "num_experts_per_tok": 5}), 64)
    qwen = load_model_spec(tiny_checkpoint("qwen2_moe"))
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        Qwen2MoeForCausalLM(dataclasses.replace(qwen, raw={**qwen.raw, "decoder_sparse_step": 0}), 64)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        Qwen2MoeForCausalLM(dataclasses.replace(qwen, hidden_act="gelu"), 64)
    # Tensor parallelism splits each expert's intermediate dimension: its width must divide.
    check_tensor_parallel(qwen, 2)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(32\)"):
        check_tensor_parallel(dataclasses.replace(qwen, raw={**qwen.raw, "moe_intermediate_size": 32}), 3)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size \(63\)"):
        check_tensor_parallel(dataclasses.replace(qwen, raw={**qwen.raw, "shared_expert_intermediate_size": 63}), 2)


def test_qwen2_moe_sliding_window_follows_use_sliding_window(tmp_path: Path) -> None:
    """Hub Qwen2-MoE configs carry a sliding_window with use_sliding_window false and no layer_types; with the flag
    on, transformers slides the even layers below max_window_layers."""
    hub = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 3,
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert load_model_spec(tmp_path).sliding_windows == (None,) * 4
    (tmp_path / "config.json").write_text(json.dumps({**hub, "use_sliding_window": True, "sliding_window": 8}))
    assert load_model_spec(tmp_path).sliding_windows == (8, None, 8, None)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
def test_triton_path_matches_transformers(
    tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy, monkeypatch
) -> None:
    """The whole model on its Triton kernels (the interpreter runs them on CPU), the fused MoE kernel included."""
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    model_dir = tiny_checkpoint("qwen2_moe", **QWEN2_MOE_WINDOW)
    prompts = coverage_prompts(model_dir)[2:5]
    reference = hf_greedy(model_dir, prompts, 12)
    assert rayinfer_greedy(model_dir, prompts, 12, max_num_batched_tokens=16) == reference


def test_tp2_on_ray_matches_transformers(greedy_matches_transformers, ray_session) -> None:
    """Two tensor-parallel Ray workers: attention heads, the dense and shared MLPs and every expert's intermediate
    dimension split in two; the router replicated (layer 0 sparse with a shared expert, layer 1 dense)."""
    name = "qwen2_moe-mlp-only-layer"
    arch, overrides = CONFIGS[name]
    greedy_matches_transformers(
        name, arch, overrides, ARCHITECTURES[arch], tensor_parallel_size=2, distributed_executor_backend="ray"
    )
