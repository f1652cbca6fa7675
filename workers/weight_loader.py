"""Builds a model for a checkpoint folder and fills it from its safetensors files (single or sharded)."""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rayinfer.workers.checkpoint import CheckpointTensor, checkpoint_tensor_names, iter_checkpoint_tensors
from rayinfer.workers.kv_scales import KV_SCALE_SUFFIXES, set_kv_scale
from rayinfer.workers.layers.linear import deferred_linear_weights
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.parallel_state import pipeline_stage
from rayinfer.workers.models import model_class_for
from rayinfer.workers.models.pipeline import MissingLayer
from rayinfer.workers.quantization.config import quant_scheme_for
from rayinfer.workers.quantization.linear_plan import QuantizedLinears

logger = logging.getLogger(__name__)

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _default_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id: object = None) -> None:
    if tuple(param.shape) != loaded.shape:
        raise ValueError(f"checkpoint tensor {loaded.name} of shape {loaded.shape} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded.full())


def _compiled(patterns: object) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in (patterns or ())]


class CheckpointNames:
    """Maps a checkpoint tensor's name onto our parameter's. A model class declares how: `checkpoint_renames`
    (regex, replacement) pairs applied in order, then `packed_modules` for names that land in a merged parameter;
    `ignored_checkpoint_tensors` (regexes) names tensors it does not use (e.g. fixed masks). A model built for one
    pipeline stage skips the tensors of the modules other stages hold (its `MissingLayer`s), and its
    `lm_head_source` names the tensor its LM head loads when tied embeddings left it without the embedding."""

    def __init__(self, model: nn.Module) -> None:
        self.packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
        self.renames = _compiled(getattr(model, "checkpoint_renames", ()))
        self.ignored = [re.compile(pattern) for pattern in getattr(model, "ignored_checkpoint_tensors", ())]
        self.tied = getattr(model, "spec", None) is not None and model.spec.tie_word_embeddings
        self.head_source: str | None = getattr(model, "lm_head_source", None)
        self.elsewhere = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MissingLayer))

    def param_name(self, name: str) -> tuple[str, object] | None:
        """(our parameter name, shard id within a merged parameter), or None for a tensor the model skips."""
        if name.endswith(_SKIPPED_SUFFIXES) or any(p.search(name) for p in self.ignored):
            return None
        for pattern, replacement in self.renames:
            name = pattern.sub(replacement, name)
        if self.tied and name == "lm_head.weight":
            return None
        if name == self.head_source:
            name = "lm_head.weight"
        if name.startswith(self.elsewhere):  # another pipeline stage loads it
            return None
        for source, (target, shard) in self.packed.items():
            if f".{source}." in name:
                return name.replace(f".{source}.", f".{target}."), shard
        return name, None


def load_weights(model: nn.Module, model_dir: str | Path, kv_cache_dtype: str = "auto") -> None:
    """Fills every parameter from the checkpoint, each through its own `weight_loader` (which may cut a
    tensor-parallel shard) or a plain copy; KV-cache scales the checkpoint ships go to an FP8 pool's attention."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    names = CheckpointNames(model)
    filled: set[str] = set()
    unexpected: list[str] = []
    for checkpoint_name, tensor in iter_checkpoint_tensors(model_dir):
        mapped = names.param_name(checkpoint_name)
        if mapped is None:
            continue
        name, shard_id = mapped
        param = params.get(name)
        if param is None and name.endswith(KV_SCALE_SUFFIXES):
            if set_kv_scale(modules, name, tensor, kv_cache_dtype == "fp8", device):
                continue
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


def build_model(
    spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, device: torch.device, max_len: int,
    quantization: str | None = None, kv_cache_dtype: str = "auto",
) -> nn.Module:
    """The model with its weights, built for this process's pipeline stage (`set_pipeline_stage`); for a quantised
    checkpoint (or `quantization`, which must agree with it) its quantised linears hold only their packed weights,
    never a float copy."""
    model_cls = model_class_for(spec)
    stage = pipeline_stage(spec.num_layers)
    if stage.count > 1 and not getattr(model_cls, "supports_pipeline_parallel", False):
        raise ValueError(
            f"pipeline_parallel_size {stage.count}: {spec.architecture} cannot be split into pipeline stages; "
            "use pipeline_parallel_size 1"
        )
    scheme = quant_scheme_for(spec.raw, quantization)
    with _default_dtype(dtype), torch.device(device):
        if scheme is None:
            model = model_cls(spec, max_len)
        else:
            with deferred_linear_weights():
                model = model_cls(spec, max_len)
            names = CheckpointNames(model)
            mapped = (names.param_name(name) for name in checkpoint_tensor_names(model_dir))
            quantized = QuantizedLinears(model, scheme, {m[0] for m in mapped if m is not None})
    load_weights(model, model_dir, kv_cache_dtype)
    if scheme is not None:
        quantized.finish()
        logger.info("quantised linears hold %.1f MiB (%.1f MiB as %s)", quantized.held_bytes() / 2**20,
                    quantized.unquantized_bytes(dtype) / 2**20, dtype)
    logger.info("loaded %s from %s (%s on %s)", spec.architecture, model_dir, dtype, device)
    return model.eval()
