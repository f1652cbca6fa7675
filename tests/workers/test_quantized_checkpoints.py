"""Quantised checkpoints (AWQ, GPTQ, compressed-tensors, FP8): each loads and equals its reference.

The reference is exact: workers/tiny_checkpoint/quantized.py writes each format from a float checkpoint whose
quantised weights it first snaps to the format's grid, and transformers running that snapped float checkpoint
must give our greedy tokens on the quantised one, token for token in float32. The packers are checked against
the maintained libraries that read the formats (AutoAWQ's unpacking, compressed-tensors through transformers).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rayinfer.kernels.triton_compat import HAS_TRITON
from rayinfer.workers.model_config import load_model_spec
from rayinfer.workers.tiny_checkpoint.quantized import write_quantized_checkpoint
from rayinfer.workers.weight_loader import build_model

NEW_TOKENS = 16

# name -> (format, options): every layout and option the readers distinguish.
FORMATS = {
    "awq-g32": ("awq", {}),
    "awq-per-channel": ("awq", {"group_size": -1}),
    "gptq-4bit-sym": ("gptq", {"symmetric": True}),
    "gptq-4bit-act-order": ("gptq", {"act_order": True, "group_size": 16}),
    "gptq-8bit-act-order-sym": ("gptq", {"bits": 8, "act_order": True, "symmetric": True}),
    "gptq-v2-4bit": ("gptq_v2", {}),
    "ct-w4a16-sym": ("ct-int", {"symmetric": True}),
    "ct-w4a16-asym": ("ct-int", {}),
    "ct-w8a16-channel": ("ct-int", {"bits": 8, "group_size": -1, "symmetric": True}),
    "ct-w4a16-act-order": ("ct-int", {"act_order": True}),
    "fp8-per-tensor": ("fp8", {}),
    "fp8-block": ("fp8", {"block": (16, 16)}),
    "ct-fp8-channel": ("ct-fp8", {"per_channel": True}),
    "ct-fp8-tensor": ("ct-fp8", {}),
}

_written: dict[str, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """quantized(name) -> (quantised folder, snapped float folder) of the tiny Llama in FORMATS[name]."""
    src = tiny_checkpoint("llama")

    def write(name: str) -> tuple[Path, Path]:
        if name not in _written:
            fmt, options = FORMATS[name]
            _written[name] = write_quantized_checkpoint(src, tmp_path_factory.mktemp(name), fmt, **options)
        return _written[name]

    return write


def _build(model_dir: Path, **kwargs):
    return build_model(load_model_spec(model_dir), model_dir, torch.float32, torch.device("cpu"), 64, **kwargs)


@pytest.mark.parametrize("name", list(FORMATS))
def test_weights_hold_packed_and_dequantise_to_the_snapped_grid(name: str, quantized) -> None:
    quant_dir, snapped_dir = quantized(name)
    model, reference = _build(quant_dir), dict(_build(snapped_dir).named_modules())
    linears = [(n, m) for n, m in model.named_modules() if getattr(m, "quantized", None) is not None]
    assert len(linears) == 8  # qkv, o, gate_up, down in each of two layers
    for module_name, module in linears:
        assert "weight" not in dict(module.named_parameters(recurse=False))  # no float copy is kept
        assert torch.equal(module.quantized.dequantized(torch.float32), reference[module_name].weight)
    for _, module in linears:  # the packed bits, plus scales (float32 here), zero points and the group index
        k, n, q = module.in_features, module.out_features, module.quantized
        if "fp8" in name:
            expected = n * k + q.weight_scale.numel() * 4
        else:
            expected = k * n * q.bits // 8 + q.scales.shape[0] * n * (4 + 1) + k * 4
        assert q.held_bytes() == expected
    assert model.lm_head.weight.dtype == torch.float32  # the LM head stays unquantised


@pytest.mark.parametrize("name", list(FORMATS))
def test_greedy_equals_transformers_on_the_snapped_checkpoint(
    name: str, quantized, hf_greedy, rayinfer_greedy, coverage_prompts, varied
) -> None:
    quant_dir, snapped_dir = quantized(name)
    prompts = coverage_prompts(snapped_dir)
    reference = hf_greedy(snapped_dir, prompts, NEW_TOKENS)
    varied(name, reference)
    assert rayinfer_greedy(quant_dir, prompts, NEW_TOKENS, max_num_batched_tokens=16) == reference


@pytest.mark.parametrize("name", ["gptq-4bit-act-order", "awq-g32", "fp8-block"])
def test_tensor_parallel_shards_packed_weights(name: str, quantized, hf_greedy, rayinfer_greedy, coverage_prompts,
                                               ray_session) -> None:
    """TP=2 on Ray cuts packed rows/columns, groups and FP8 blocks at their boundaries (act-order keeps every
    group's scales on each rank)."""
    quant_dir, snapped_dir = quantized(name)
    prompts = coverage_prompts(snapped_dir)
    ours = rayinfer_greedy(quant_dir, prompts, NEW_TOKENS, tensor_parallel_size=2, distributed_executor_backend="ray")
    assert ours == hf_greedy(snapped_dir, prompts, NEW_TOKENS)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
@pytest.mark.parametrize("name", ["gptq-4bit-act-order", "awq-g32", "gptq-8bit-act-order-sym"])
def test_triton_kernels_read_the_packed_weights(name: str, quantized, hf_greedy, coverage_prompts, monkeypatch) -> None:
    """The CUDA path's W4A16/W8A16 kernels (forced; the interpreter runs them on CPU), dequantising in registers,
    give transformers' greedy tokens; prefill takes the GEMM kernel and decode the GEMV one."""
    from rayinfer.cluster import LLM, SamplingParams

    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    quant_dir, snapped_dir = quantized(name)
    prompts = coverage_prompts(snapped_dir)[:2]
    llm = LLM(str(quant_dir), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(snapped_dir, prompts, 6)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
@pytest.mark.parametrize("name", ["fp8-block", "ct-fp8-channel"])
def test_fp8_w8a8_kernels_stay_within_the_w8a16_top5(name: str, quantized, coverage_prompts, monkeypatch) -> None:
    """With dynamic activation scales the CUDA path quantises activations too (W8A8), so it is not the grid
    reference; vLLM's check_logprobs_close rule holds it to the CPU path's W8A16: where the greedy tokens first
    differ, each run's token is among the other's top 5."""
    from rayinfer.cluster import LLM, SamplingParams

    quant_dir, snapped_dir = quantized(name)
    prompts = [{"prompt_token_ids": p} for p in coverage_prompts(snapped_dir)[:2]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    runs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", backend)
        runs.append([o.outputs[0] for o in LLM(str(quant_dir), dtype="float32").generate(prompts, params,
                                                                                         use_tqdm=False)])
    for w8a16, w8a8 in zip(*runs):
        for i, (a, b) in enumerate(zip(w8a16.token_ids, w8a8.token_ids)):
            if a != b:
                assert a in w8a8.logprobs[i] and b in w8a16.logprobs[i], (i, w8a16.token_ids, w8a8.token_ids)
                break


def test_awq_packer_agrees_with_autoawq(quantized) -> None:
    """AutoAWQ's own unpacking (awq/utils/packing_utils.py, loaded alone: the package's __init__ pulls in its
    CUDA models) reads our qweight and qzeros as the snapped grid's values."""
    spec = importlib.util.find_spec("awq")
    assert spec is not None and spec.submodule_search_locations, "autoawq is installed by scripts/setup.sh"
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    packing = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(packing)
    from safetensors.torch import load_file

    quant_dir, snapped_dir = quantized("awq-g32")
    tensors, snapped = load_file(quant_dir / "model.safetensors"), load_file(snapped_dir / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj"
    q, z = packing.unpack_awq(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], 4)
    q, z = packing.reverse_awq_order(q, z, 4)
    q, z = q & 15, z & 15
    scales = tensors[f"{prefix}.scales"].float()
    group = json.loads((quant_dir / "config.json").read_text())["quantization_config"]["group_size"]
    weight = (q.float() - z.float().repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    assert torch.equal(weight.t(), snapped[f"{prefix}.weight"])


@pytest.mark.parametrize("name", ["ct-w4a16-sym", "ct-w4a16-asym", "ct-fp8-channel"])
def test_compressed_tensors_checkpoints_decompress_in_transformers_to_the_snapped_weights(name: str, quantized) -> None:
    """compressed-tensors itself (through transformers, decompressing on load) reads our checkpoint as the snapped
    grid's values. (Its current release refuses actorder "group", which older llm-compressor checkpoints carry,
    so that option is checked against the snapped reference only.)"""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    quant_dir, snapped_dir = quantized(name)
    theirs = AutoModelForCausalLM.from_pretrained(
        quant_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    snapped = AutoModelForCausalLM.from_pretrained(snapped_dir, dtype=torch.float32)
    for layer, reference in zip(theirs.model.layers, snapped.model.layers):
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            decompressed, expected = layer.get_submodule(part).weight, reference.get_submodule(part).weight
            if name.startswith("ct-w4"):
                # compressed-tensors multiplies in the scales' float16, so it holds each snapped value (a small
                # integer times a float16 scale: exact in float32) rounded to float16
                expected = expected.half().float()
            assert torch.equal(decompressed.float(), expected), part


def _with_quant_config(src: Path, tmp_path: Path, quantization_config: dict) -> Path:
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("quantization_config", "words"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "quantization_config.version"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "quantization_config.bits"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "quantization_config.group_size"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size"),
        ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
            "g": {"weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 32}}}},
         "quantization_config.format"),
    ],
)
def test_unsupported_schemes_are_refused_naming_the_field(quantization_config, words, tiny_checkpoint, tmp_path):
    model_dir = _with_quant_config(tiny_checkpoint("llama"), tmp_path, quantization_config)
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        _build(model_dir)


def test_quantization_flag_must_match_the_checkpoint(quantized, tiny_checkpoint) -> None:
    quant_dir, _ = quantized("awq-g32")
    with pytest.raises(ValueError, match="does not match config.json's quant_method 'awq'"):
        _build(quant_dir, quantization="gptq")
    with pytest.raises(ValueError, match="has no quantization_config"):
        _build(tiny_checkpoint("llama"), quantization="fp8")
    assert _build(quant_dir, quantization="awq").model.layers[0].mlp.down_proj.quantized is not None


def test_a_quantised_tensor_the_engine_cannot_place_is_refused(quantized, tmp_path) -> None:
    """A quantised LM head (some GPTQ checkpoints quantise it) is refused by name instead of loading wrong."""
    import shutil

    from safetensors.torch import load_file, save_file

    quant_dir, _ = quantized("gptq-4bit-sym")
    out = tmp_path / "lm-head"
    shutil.copytree(quant_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.qweight"] = torch.zeros(8, 8, dtype=torch.int32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantised tensors of \['lm_head'\] are not supported"):
        _build(out)


def test_a_group_split_by_tensor_parallelism_is_refused(quantized) -> None:
    """Row-parallel o_proj at TP=4 holds 16 input features per rank: a 32-wide group would be cut in two."""
    from rayinfer.workers.parallel_state import set_tensor_parallel_group

    quant_dir, _ = quantized("awq-g32")
    set_tensor_parallel_group(0, 4)
    try:
        with pytest.raises(ValueError, match="group_size 32 does not divide this rank's 16 input features"):
            _build(quant_dir)
    finally:
        set_tensor_parallel_group(0, 1)


def test_a_fused_checkpoint_layout_is_refused_by_layer(tiny_checkpoint, tmp_path) -> None:
    """Phi-3 stores qkv fused and reads it with a loader of its own: quantised, that layer is refused by name."""
    quant_dir, _ = write_quantized_checkpoint(tiny_checkpoint("phi3"), tmp_path, "gptq", symmetric=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj: this architecture reads"):
        _build(quant_dir)
