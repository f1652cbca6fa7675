"""Reads a checkpoint's `quantization_config` (config.json) into the one scheme its linear layers use.

Formats: AWQ (4-bit GEMM layout), GPTQ (4/8-bit, v1 or v2 zeros, desc_act), FP8 e4m3 (per-tensor, per-channel or
block-wise scales; `activation_scheme` dynamic asks for W8A8) and compressed-tensors (llm-compressor) with its
pack-quantized W4A16/W8A16 and float-quantized FP8 schemes. Which layers are quantised is read from the
checkpoint's tensors (a layer with `qweight`, `weight_packed` or a weight scale), so `modules_to_not_convert` and
`ignore` lists need no matching of their own. Every refusal names the config field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANTIZATION_METHODS = ("awq", "gptq", "fp8", "compressed-tensors")


@dataclass(frozen=True)
class IntScheme:
    """Integer weights with a scale (and zero point) per group of `group_size` input features (-1: the whole row).

    layout: "awq" (qweight [in, out/pack] in AWQ's interleaved order), "gptq" (qweight [in/pack, out]) or
    "pack_quantized" (compressed-tensors: weight_packed [out, in/pack], values offset to unsigned)."""

    layout: str
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool = False
    zero_offset: int = 0  # GPTQ v1 stores each zero point minus one

    @property
    def pack(self) -> int:
        return 32 // self.bits


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 e4m3 weights [out, in] with a per-tensor, per-channel or block-wise scale.

    layout: "fp8" (transformers/vLLM `quant_method: fp8`) or "float_quantized" (compressed-tensors)."""

    layout: str
    block_size: tuple[int, int] | None  # (out, in) features per scale; None: per-tensor or per-channel
    dynamic_activations: bool  # W8A8 with a per-token activation scale computed each step (on GPUs that have FP8)


QuantScheme = IntScheme | Fp8Scheme


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"quantization_config.{field} {value!r} is not supported: {why}")


def _int_field(cfg: dict[str, Any], name: str, allowed: tuple[int, ...] | None = None, default: Any = None) -> int:
    value = cfg.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or (allowed is not None and value not in allowed):
        raise _bad(name, value, f"expected one of {allowed}" if allowed else "expected an integer")
    return value


def _group_size(cfg: dict[str, Any], name: str = "group_size") -> int:
    group = _int_field(cfg, name, default=-1)
    if group != -1 and group <= 0:
        raise _bad(name, group, "expected a positive group size or -1")
    return group


def _awq(cfg: dict[str, Any]) -> IntScheme:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise _bad("version", version, "only AutoAWQ's GEMM layout is read")
    if not cfg.get("zero_point", True):
        raise _bad("zero_point", cfg.get("zero_point"), "AWQ checkpoints without zero points are not read")
    bits = _int_field(cfg, "bits", (4,), cfg.get("w_bit", 4))
    return IntScheme("awq", bits, _group_size(cfg, "group_size" if "group_size" in cfg else "q_group_size"), False)


def _gptq(cfg: dict[str, Any]) -> IntScheme:
    fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _bad("checkpoint_format", fmt, "expected gptq or gptq_v2")
    return IntScheme(
        "gptq", _int_field(cfg, "bits", (4, 8)), _group_size(cfg), bool(cfg.get("sym", True)),
        act_order=bool(cfg.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0,
    )


def _fp8(cfg: dict[str, Any]) -> Fp8Scheme:
    scheme = str(cfg.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise _bad("activation_scheme", scheme, "expected dynamic or static")
    if str(cfg.get("fmt", "e4m3")).lower() != "e4m3":
        raise _bad("fmt", cfg.get("fmt"), "only e4m3 weights are read")
    block = cfg.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise _bad("weight_block_size", block, "expected [out, in] positive integers")
        block = (block[0], block[1])
    # A static scheme's input scales are loaded and not used: activations are scaled per token instead.
    return Fp8Scheme("fp8", block, dynamic_activations=True)


def _compressed_tensors(cfg: dict[str, Any]) -> QuantScheme:
    groups = cfg.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise _bad("config_groups", groups, "expected at least one quantisation group")
    schemes = {repr(group.get("weights")) for group in groups.values() if isinstance(group, dict)}
    if len(schemes) != 1:
        raise _bad("config_groups", list(groups), "groups with different weight schemes are not read")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    fmt = str(group.get("format") or cfg.get("format") or "").lower()
    kind, bits = weights.get("type"), weights.get("num_bits")
    if weights.get("dynamic"):
        raise _bad("config_groups.weights.dynamic", True, "weights must be quantised in the checkpoint")
    if kind == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized"):
        strategy = weights.get("strategy")
        block = weights.get("block_structure")
        if strategy == "block":
            if not (isinstance(block, list) and len(block) == 2):
                raise _bad("config_groups.weights.block_structure", block, "expected [out, in]")
            block = (int(block[0]), int(block[1]))
        elif strategy not in ("tensor", "channel"):
            raise _bad("config_groups.weights.strategy", strategy, "FP8 weights read tensor, channel or block")
        activations = group.get("input_activations") or {}
        return Fp8Scheme("float_quantized", block if strategy == "block" else None, bool(activations))
    if kind == "int" and bits in (4, 8) and fmt == "pack-quantized":
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise _bad("config_groups.weights.strategy", strategy, "packed int weights read group or channel")
        group_size = _group_size(weights) if strategy == "group" else -1
        act_order = weights.get("actorder") == "group"  # "weight" and "static" keep groups contiguous
        return IntScheme("pack_quantized", bits, group_size, bool(weights.get("symmetric", True)), act_order=act_order)
    raise _bad("format", fmt, f"compressed-tensors schemes read are pack-quantized int4/int8 and float-quantized "
               f"fp8 (this checkpoint has {kind} {bits}-bit weights)")


_READERS = {"awq": _awq, "gptq": _gptq, "fp8": _fp8, "compressed-tensors": _compressed_tensors}


def quant_scheme_for(raw_config: dict[str, Any], forced: str | None = None) -> QuantScheme | None:
    """The checkpoint's scheme, None for an unquantised one. `forced` (--quantization) must agree with the
    checkpoint's own `quant_method`, as a checkpoint can only be read in the format it was written in."""
    cfg = raw_config.get("quantization_config") or raw_config.get("compression_config")
    method = str(cfg.get("quant_method", "")).lower().replace("_", "-") if isinstance(cfg, dict) else None
    if forced is not None and forced not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {forced!r} is not one of {', '.join(QUANTIZATION_METHODS)}")
    if method is None:
        if forced is not None:
            raise ValueError(f"quantization {forced!r} was asked for but config.json has no quantization_config")
        return None
    if method not in _READERS:
        raise _bad("quant_method", method, f"expected one of {', '.join(QUANTIZATION_METHODS)}")
    if forced is not None and forced != method:
        raise ValueError(f"quantization {forced!r} does not match config.json's quant_method {method!r}")
    return _READERS[method](cfg)
