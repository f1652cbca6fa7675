"""AWQ, GPTQ and compressed-tensors pack-quantized weights: the parameters each stores, per rank, and their
conversion after loading into the one packed layout the kernels read (`IntQuantizedWeight`).

Stored layouts (K input features, N output features, G groups, pack = 32 // bits values per int32):
- AWQ: qweight [K, N/pack] and qzeros [G, N/pack], packed along N in AutoAWQ's interleaved order (word nibble i
  holds column AWQ_ORDER[i] of its eight), scales [G, N]; W = (q - z) * s.
- GPTQ: qweight [K/pack, N] packed along K, qzeros [G, N/pack] packed along N (v1 stores z - 1), scales [G, N],
  g_idx [K] (the group of each input row; with desc_act a permutation, and scales cover the whole input).
- compressed-tensors pack-quantized: weight_packed [N, K/pack] packed along K, values offset by 2**(bits-1) to
  unsigned; weight_scale [N, G]; weight_zero_point [N/pack, G] packed along N (asymmetric only); weight_shape;
  weight_g_idx [K] with activation ordering "group".
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.quantization.config import IntScheme
from rayinfer.workers.quantization.quantized_weight import IntQuantizedWeight
from rayinfer.workers.quantization.stored_params import checked_same_loader, pack_int32, stored_param, take_stored
from rayinfer.workers.quantization.stored_params import unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: nibble i of a word holds column AWQ_ORDER[i]


def _groups(scheme: IntScheme, in_features: int, full_in: int, what: str) -> tuple[int, int, int | None]:
    """(group size, groups this rank stores, in_dim of the group tables: None when every rank holds them whole)."""
    if scheme.group_size == -1:
        return in_features, 1, None
    if scheme.act_order:  # g_idx points into groups of the whole input, so every rank keeps all of them
        return scheme.group_size, -(-full_in // scheme.group_size), None
    if in_features % scheme.group_size:
        raise ValueError(f"{what}: group_size {scheme.group_size} does not divide this rank's {in_features} input "
                         f"features; use a tensor_parallel_size that keeps groups whole")
    return scheme.group_size, in_features // scheme.group_size, 0


def create_int_params(module: nn.Module, scheme: IntScheme, full_in: int, what: str) -> None:
    """Replaces `module`'s float weight with the parameters of `scheme`'s layout for this rank's shard."""
    k, n, pack, bits = module.in_features, module.out_features, scheme.pack, scheme.bits
    if k % pack or n % pack:
        raise ValueError(f"{what}: {k} input and {n} output features per rank must be multiples of {pack} for "
                         f"{bits}-bit packing")
    group, g, g_dim = _groups(scheme, k, full_in, what)
    dtype = torch.get_default_dtype()
    if "weight" in module._parameters:
        del module._parameters["weight"]
    if scheme.layout == "awq":
        stored_param(module, "qweight", (k, n // pack), torch.int32, 1, 0, out_per_element=pack)
        stored_param(module, "qzeros", (g, n // pack), torch.int32, 1, g_dim, pack, group)
        stored_param(module, "scales", (g, n), dtype, 1, g_dim, 1, group)
    elif scheme.layout == "gptq":
        stored_param(module, "qweight", (k // pack, n), torch.int32, 1, 0, in_per_element=pack)
        stored_param(module, "qzeros", (g, n // pack), torch.int32, 1, g_dim, pack, group)
        stored_param(module, "scales", (g, n), dtype, 1, g_dim, 1, group)
        stored_param(module, "g_idx", (k,), torch.int32, None, 0, loader=checked_same_loader(module))
    else:
        g_dim_ct = None if g_dim is None else 1
        stored_param(module, "weight_packed", (n, k // pack), torch.int32, 0, 1, in_per_element=pack)
        stored_param(module, "weight_scale", (n, g), dtype, 0, g_dim_ct, 1, group)
        stored_param(module, "weight_shape", (2,), torch.int64, None, None)
        if not scheme.symmetric:
            stored_param(module, "weight_zero_point", (n // pack, g), torch.int32, 0, g_dim_ct, pack, group)
        if scheme.act_order:
            stored_param(module, "weight_g_idx", (k,), torch.int32, None, 0, loader=checked_same_loader(module))


def _contiguous_groups(k: int, group: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(k, dtype=torch.int32, device=device) // group).to(torch.int32)


def finish_int(module: nn.Module, scheme: IntScheme, full_in: int, what: str) -> IntQuantizedWeight:
    """Converts the loaded parameters into the kernels' layout: qweight [K/pack, N] packed along K, scales [G, N],
    zero points uint8 [G, N] (final values) and g_idx [K]; the checkpoint-layout parameters are dropped."""
    k, bits, mask = module.in_features, scheme.bits, (1 << scheme.bits) - 1
    group, _, _ = _groups(scheme, k, full_in, what)
    names = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_shape",
             "weight_zero_point", "weight_g_idx")
    t = take_stored(module, names)
    if scheme.layout == "awq":
        order = torch.tensor(AWQ_ORDER, device=t["qweight"].device).argsort()  # column j of 8 sits in nibble order[j]
        values = unpack_int32(t["qweight"], bits, 1).unflatten(1, (-1, scheme.pack))[..., order].flatten(1)
        zeros = unpack_int32(t["qzeros"], bits, 1).unflatten(1, (-1, scheme.pack))[..., order].flatten(1)
        qweight, scales, g_idx = pack_int32(values, bits, 0), t["scales"], None
    elif scheme.layout == "gptq":
        qweight = t["qweight"].contiguous()
        zeros = (unpack_int32(t["qzeros"], bits, 1) + scheme.zero_offset) & mask  # v1: the stored z - 1, wrapped
        scales = t["scales"]
        g_idx = t["g_idx"] if scheme.act_order else None
    else:
        qweight = pack_int32(unpack_int32(t["weight_packed"], bits, 1).t(), bits, 0)
        scales = t["weight_scale"].t()
        if scheme.symmetric:
            zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_int32(t["weight_zero_point"], bits, 0).t()
        g_idx = t["weight_g_idx"] if scheme.act_order else None
    if g_idx is None:
        g_idx = _contiguous_groups(k, group, qweight.device)
    return IntQuantizedWeight(
        qweight, scales.contiguous(), zeros.to(torch.uint8).contiguous(), g_idx.to(torch.int32).contiguous(), bits,
        None if scheme.act_order else group,
    )
