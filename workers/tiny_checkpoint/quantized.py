"""Writes a quantised copy of a float checkpoint in AWQ, GPTQ, compressed-tensors or FP8 format, and beside it
the float "snapped" checkpoint: the same model with every quantised weight replaced by exactly the values the
quantised one stands for. transformers running the snapped checkpoint is then the exact reference for an engine
running the quantised one.

The packing follows each format's public description (AutoAWQ's GEMM layout, GPTQ's v1/v2 QuantLinear tensors,
compressed-tensors' pack-quantized and float-quantized compressors, transformers' fine-grained FP8); the tests
check it against the maintained libraries where they can read it. Only the decoder's attention and MLP
projections are quantised, as the formats' own tools do by default (embeddings, norms and the LM head stay).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_QUANTISED = re.compile(r"\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)\.weight$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_MAX = 448.0


def _pack(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned values packed 32 // bits to an int32 along `dim`, lowest bits first; `order[i]` names which of
    each word's values goes in slot i (AWQ interleaves them)."""
    pack = 32 // bits
    moved = values.to(torch.int64).movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, pack)
    if order is not None:
        grouped = grouped[..., list(order)]
    words = (grouped << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _int_grid(weight: torch.Tensor, bits: int, group: int, symmetric: bool, g_idx: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] unsigned, zeros [N, G], scales float16 [N, G], snapped float32 weight) for groups `g_idx`."""
    maxq = 2**bits - 1
    n, num_groups = weight.shape[0], int(g_idx.max()) + 1
    lo = torch.zeros(n, num_groups).scatter_reduce(1, g_idx.long().expand(n, -1), weight, "amin", include_self=False)
    hi = torch.zeros(n, num_groups).scatter_reduce(1, g_idx.long().expand(n, -1), weight, "amax", include_self=False)
    if symmetric:
        scales = (torch.maximum(hi.abs(), lo.abs()) / (2 ** (bits - 1) - 1)).clamp(min=1e-6).half()
        zeros = torch.full_like(lo, 2 ** (bits - 1), dtype=torch.int64)
    else:
        scales = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq).long()
    s, z = scales.float()[:, g_idx.long()], zeros[:, g_idx.long()]
    q = torch.round(weight / s + z).clamp(0, maxq).long()
    return q, zeros, scales, (q - z).float() * s


def _group_index(k: int, group: int, act_order: bool, seed: int) -> torch.Tensor:
    if group == -1:
        group = k
    if not act_order:
        return torch.arange(k, dtype=torch.int32) // group
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))  # GPTQ's desc_act column order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k, dtype=torch.int32) // group).to(torch.int32)
    return g_idx


def _int_tensors(name: str, weight: torch.Tensor, fmt: str, bits: int, group: int, symmetric: bool,
                 act_order: bool, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    # One seed for every layer: q, k and v (and gate and up) read one input, so GPTQ gives them one column order.
    prefix = name.removesuffix(".weight")
    g_idx = _group_index(weight.shape[1], group, act_order, seed)
    q, zeros, scales, snapped = _int_grid(weight, bits, group, symmetric, g_idx)
    if fmt == "awq":
        out = {"qweight": _pack(q.t(), bits, 1, AWQ_ORDER), "qzeros": _pack(zeros.t(), bits, 1, AWQ_ORDER),
               "scales": scales.t().contiguous()}
    elif fmt in ("gptq", "gptq_v2"):
        stored_zeros = (zeros - 1) & (2**bits - 1) if fmt == "gptq" else zeros  # v1 stores z - 1
        out = {"qweight": _pack(q.t(), bits, 0), "qzeros": _pack(stored_zeros.t(), bits, 1),
               "scales": scales.t().contiguous(), "g_idx": g_idx}
    else:  # compressed-tensors pack-quantized: signed values, offset back to unsigned when packed
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        offset = 2 ** (bits - 1)
        out = {"weight_packed": pack_to_int32((q - offset).to(torch.int8), bits),
               "weight_scale": scales.contiguous(), "weight_shape": torch.tensor(list(weight.shape))}
        if not symmetric:
            out["weight_zero_point"] = pack_to_int32((zeros - offset).to(torch.int8), bits, packed_dim=0)
        if act_order:
            out["weight_g_idx"] = g_idx
    return {f"{prefix}.{key}": value for key, value in out.items()}, snapped


def _fp8_tensors(name: str, weight: torch.Tensor, fmt: str, block: tuple[int, int] | None, per_channel: bool
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    prefix = name.removesuffix(".weight")
    n, k = weight.shape
    if block is not None:
        bn, bk = block
        blocks = weight.reshape(n // bn, bn, k // bk, bk).abs().amax(dim=(1, 3))
        scale = (blocks / FP8_MAX).clamp(min=1e-12)
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    elif per_channel:
        scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        full = scale
    else:
        scale = (weight.abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(())
        full = scale
    q = (weight / full).to(torch.float8_e4m3fn)
    snapped = q.float() * full
    scale_name = "weight_scale_inv" if (fmt == "fp8" and block is not None) else "weight_scale"
    out = {"weight": q, scale_name: scale.float()}
    if fmt == "fp8" and block is None:
        out["input_scale"] = torch.tensor(1.0)  # a static scheme's activation scale, as AutoFP8 writes one
    return {f"{prefix}.{key}": value for key, value in out.items()}, snapped


def _quantization_config(fmt: str, bits: int, group: int, symmetric: bool, act_order: bool,
                         block: tuple[int, int] | None, per_channel: bool) -> dict[str, Any]:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if fmt in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": symmetric,
                "checkpoint_format": fmt}
    if fmt == "fp8":
        config = {"quant_method": "fp8", "activation_scheme": "dynamic" if block else "static"}
        return config | ({"weight_block_size": list(block)} if block else {})
    if fmt == "ct-int":
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group != -1 else
                   "channel", "group_size": group if group != -1 else None,
                   "actorder": "group" if act_order else None, "dynamic": False}
        scheme_format, activations = "pack-quantized", None
    else:  # ct-fp8
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "block" if block else ("channel" if per_channel else "tensor"),
                   "block_structure": list(block) if block else None}
        scheme_format = "float-quantized"
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": scheme_format, "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                  "input_activations": activations}}}


def write_quantized_checkpoint(
    src: str | Path, out: str | Path, fmt: str, bits: int = 4, group_size: int = 32, symmetric: bool = False,
    act_order: bool = False, block: tuple[int, int] | None = None, per_channel: bool = False, seed: int = 0,
) -> tuple[Path, Path]:
    """fmt: awq | gptq | gptq_v2 | ct-int | fp8 | ct-fp8. Returns (quantised folder, snapped float folder), both
    complete checkpoints (config, tokenizer) under `out`."""
    src, out = Path(src), Path(out)
    quant_dir, snapped_dir = out / "quantized", out / "snapped"
    for folder in (quant_dir, snapped_dir):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(path))
    quantised, snapped = {}, {}
    for name, tensor in sorted(tensors.items()):
        if not _QUANTISED.search(name):
            quantised[name] = snapped[name] = tensor
            continue
        weight = tensor.float()
        if fmt in ("fp8", "ct-fp8"):
            parts, snapped[name] = _fp8_tensors(name, weight, fmt, block, per_channel)
        else:
            parts, snapped[name] = _int_tensors(name, weight, fmt, bits, group_size, symmetric, act_order, seed)
        quantised.update(parts)
    save_file({k: v.contiguous() for k, v in quantised.items()}, str(quant_dir / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in snapped.items()}, str(snapped_dir / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _quantization_config(fmt, bits, group_size, symmetric, act_order, block,
                                                         per_channel)
    (quant_dir / "config.json").write_text(json.dumps(config, indent=2))
    return quant_dir, snapped_dir
