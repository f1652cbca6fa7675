"""KV-cache scales shipped in a checkpoint (`self_attn.k_scale` / `v_scale`) reach an FP8 pool's attention layers,
cut to each rank's KV heads, and are left unused by other pools."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayinfer.workers.kv_scales import _rank_heads
from rayinfer.workers.model_config import load_model_spec
from rayinfer.workers.parallel_state import set_tensor_parallel_group
from rayinfer.workers.weight_loader import build_model


@pytest.fixture(scope="module")
def scaled_checkpoint(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-scales") / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.02)  # per layer
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.03)
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor([0.01, 0.04])  # per KV head (the tiny model has 2)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([0.05, 0.06])
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _build(model_dir, kv_cache_dtype):
    spec = load_model_spec(model_dir)
    return build_model(spec, model_dir, torch.float32, torch.device("cpu"), 64, kv_cache_dtype=kv_cache_dtype)


def test_an_fp8_pool_takes_the_checkpoint_scales(scaled_checkpoint) -> None:
    model = _build(scaled_checkpoint, "fp8")
    first, second = (layer.self_attn.attn for layer in model.model.layers)
    assert torch.equal(first.k_scale, torch.tensor([0.02])) and torch.equal(first.v_scale, torch.tensor([0.03]))
    assert torch.equal(second.k_scale, torch.tensor([0.01, 0.04]))
    assert torch.equal(second.v_scale, torch.tensor([0.05, 0.06]))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_other_pools_leave_them_unused(scaled_checkpoint, kv_cache_dtype) -> None:
    """They are calibrated for e4m3: an int8 pool computes its own."""
    model = _build(scaled_checkpoint, kv_cache_dtype)
    assert all(layer.self_attn.attn.k_scale is None for layer in model.model.layers)


@pytest.mark.parametrize(("tp", "rank", "expected"), [(2, 0, [1.0, 2.0]), (2, 1, [3.0, 4.0]), (8, 5, [3.0])])
def test_per_head_scales_follow_the_ranks_heads(tp, rank, expected) -> None:
    """Four KV heads: two per rank at TP=2; at TP=8 each head is replicated on two ranks (rank 5 holds head 2)."""
    set_tensor_parallel_group(rank, tp)
    try:
        assert _rank_heads(torch.tensor([1.0, 2.0, 3.0, 4.0]), "k_scale").tolist() == expected
    finally:
        set_tensor_parallel_group(0, 1)
