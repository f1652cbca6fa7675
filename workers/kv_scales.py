"""Static KV-cache scales a checkpoint ships (`self_attn.k_scale` / `v_scale`, as llm-compressor and vLLM write
them: one per layer, or one per KV head), set on the layer's PagedAttention for an FP8 pool to use instead of
scales computed as rows are written. They are calibrated for e4m3, so an int8 pool (or none) leaves them unused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rayinfer.workers.layers.attention import PagedAttention
from rayinfer.workers.parallel_state import tp_group

KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


def _attention_of(modules: dict[str, nn.Module], owner: str) -> PagedAttention | None:
    module = modules.get(owner)
    if isinstance(module, PagedAttention):
        return module
    return next((m for m in module.children() if isinstance(m, PagedAttention)), None) if module is not None else None


def _rank_heads(scale: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's share of a per-head scale (KV heads split across ranks, or replicated when fewer)."""
    if scale.numel() == 1:
        return scale.reshape(1)
    tp, total = tp_group(), scale.numel()
    if total >= tp.size:
        if total % tp.size:
            raise ValueError(f"checkpoint tensor {name} has {total} KV heads, not divisible by tensor_parallel_size")
        per_rank = total // tp.size
        return scale.reshape(-1)[tp.rank * per_rank : (tp.rank + 1) * per_rank]
    return scale.reshape(-1)[tp.rank // (tp.size // total)].reshape(1)


def set_kv_scale(modules: dict[str, nn.Module], name: str, tensor: Any, keep: bool, device: torch.device) -> bool:
    """Sets checkpoint tensor `name` (our naming) on its attention when `keep`; False if no attention owns it."""
    owner, _, kind = name.rpartition(".")
    attention = _attention_of(modules, owner)
    if attention is None:
        return False
    if keep:
        value = _rank_heads(tensor.full().to(torch.float32), name)
        if value.numel() not in (1, attention.num_kv_heads):
            raise ValueError(f"checkpoint tensor {name} holds {value.numel()} scales for {attention.num_kv_heads} "
                             f"KV heads on this rank")
        setattr(attention, kind, value.to(device))
    return True
