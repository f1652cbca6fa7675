"""Checkpoint loading: each tensor-parallel rank reads only its own shard of the safetensors files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayinfer.workers import weight_loader
from rayinfer.workers.checkpoint import checkpoint_files
from rayinfer.workers.model_config import load_model_spec
from rayinfer.workers.parallel_state import set_tensor_parallel_group


@pytest.fixture
def rank_one_of_two():
    set_tensor_parallel_group(1, 2)
    yield
    set_tensor_parallel_group(0, 1)


def test_a_rank_reads_only_its_shard(tiny_checkpoint, rank_one_of_two, monkeypatch) -> None:
    model_dir: Path = tiny_checkpoint("llama", num_key_value_heads=1)  # 1 KV head over 2 ranks: replicated
    spec = load_model_spec(model_dir)
    seen = []
    original = weight_loader.iter_checkpoint_tensors

    def recording(path):
        for name, tensor in original(path):
            seen.append(tensor)
            yield name, tensor

    monkeypatch.setattr(weight_loader, "iter_checkpoint_tensors", recording)
    model = weight_loader.build_model(spec, model_dir, torch.float32, torch.device("cpu"), 64)
    full = {}
    for path in checkpoint_files(model_dir):
        full.update(load_file(str(path)))
    read = {t.name: t.num_elements_read for t in seen}
    layer = "model.layers.0"
    # Split tensors: half read. Replicated ones (norms, the single KV head, o_proj's bias-free rows...) in full.
    assert read[f"{layer}.self_attn.q_proj.weight"] == full[f"{layer}.self_attn.q_proj.weight"].numel() // 2
    assert read[f"{layer}.mlp.down_proj.weight"] == full[f"{layer}.mlp.down_proj.weight"].numel() // 2
    assert read["model.embed_tokens.weight"] == full["model.embed_tokens.weight"].numel() // 2
    assert read[f"{layer}.self_attn.k_proj.weight"] == full[f"{layer}.self_attn.k_proj.weight"].numel()
    assert read[f"{layer}.input_layernorm.weight"] == full[f"{layer}.input_layernorm.weight"].numel()

    attn = model.model.layers[0].self_attn
    q_rows = spec.num_heads // 2 * spec.head_dim
    q_full = full[f"{layer}.self_attn.q_proj.weight"]
    torch.testing.assert_close(attn.qkv_proj.weight[:q_rows], q_full[q_rows:], rtol=0, atol=0)
    k_full = full[f"{layer}.self_attn.k_proj.weight"]
    torch.testing.assert_close(attn.qkv_proj.weight[q_rows : q_rows + spec.head_dim], k_full, rtol=0, atol=0)
    down = full[f"{layer}.mlp.down_proj.weight"]
    half = spec.intermediate_size // 2
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, down[:, half:], rtol=0, atol=0)


def test_tensor_of_the_wrong_shape_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_size"] = 32  # the weights say 64
    config["head_dim"] = 16
    (model_dir / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(model_dir)
    with pytest.raises(ValueError, match=r"checkpoint tensor \S+ of shape \(512, 64\) does not fit parameter"):
        weight_loader.build_model(spec, model_dir, torch.float32, torch.device("cpu"), 64)
