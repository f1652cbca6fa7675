"""Builds a model for a checkpoint folder and fills it from its safetensors files (single or sharded)."""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rayinfer.workers.checkpoint import CheckpointTensor, iter_checkpoint_tensors
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models import model_class_for

logger = logging.getLogger(__name__)

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _default_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
    if tuple(param.shape) != loaded.shape:
        raise ValueError(f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded.full())


def _compiled(patterns: object) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in (patterns or ())]


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fills every parameter from the checkpoint. A model class declares how HF names map onto its own:
    `checkpoint_renames` (regex, replacement) pairs applied in order, then `packed_modules` for names that land in
    a merged parameter; `ignored_checkpoint_tensors` (regexes) names tensors it does not use (e.g. fixed masks)."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    renames = _compiled(getattr(model, "checkpoint_renames", ()))
    ignored = [re.compile(pattern) for pattern in getattr(model, "ignored_checkpoint_tensors", ())]
    tied = getattr(model, "spec", None) is not None and model.spec.tie_word_embeddings
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_checkpoint_tensors(model_dir):
        if name.endswith(_SKIPPED_SUFFIXES) or any(p.search(name) for p in ignored):
            continue
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if tied and name == "lm_head.weight":
            continue
        shard_id = None
        for source, (target, shard) in packed.items():
            if f".{source}." in name:
                name, shard_id = name.replace(f".{source}.", f".{target}."), shard
                break
        param = params.get(name)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", _default_loader)
        try:
            loader(param, tensor, shard_id)  # copy_ casts to the parameter's dtype
        except RuntimeError as exc:  # a shape that disagrees with config.json
            raise ValueError(
                f"checkpoint tensor {name} of shape {tensor.shape} does not fit parameter {name} of shape "
                f"{tuple(param.shape)} built from config.json: {exc}"
            ) from exc
        filled.add(name)
    if unexpected:
        raise ValueError(f"checkpoint {model_dir} has tensors this model does not use: {unexpected[:8]}")
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors the model needs: {missing[:8]}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, device: torch.device, max_len: int) -> nn.Module:
    model_cls = model_class_for(spec)
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(spec, max_len)
    load_weights(model, model_dir)
    logger.info("loaded %s from %s (%s on %s)", spec.architecture, model_dir, dtype, device)
    return model.eval()
