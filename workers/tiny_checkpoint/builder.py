"""Writes whole tiny checkpoints (`build_tiny_checkpoint`) and keeps the default ones cached once per machine."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rayinfer.configs.cache_dir import cache_root
from rayinfer.workers.tiny_checkpoint.architectures import SIZES, SUPPORTED_TINY_ARCHS, make_config
from rayinfer.workers.tiny_checkpoint.random_init import spread_init
from rayinfer.workers.tiny_checkpoint.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

# Bumped whenever the recipe (tokenizer, architectures, random_init) changes, so default_tiny_model_dir never
# serves a stale cached build.
TINY_FORMAT_VERSION = 1


def build_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **config_overrides: Any,
) -> Path:
    """Writes a complete HF checkpoint folder (config, safetensors, tokenizer, generation config) and returns it.

    dtype / device: where the random weights are made and how they are saved (a GPU benchmark's 8B checkpoint is
    drawn on the GPU in bfloat16: on a CPU in float32 it would take minutes and 32 GB)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, pad_to=config_overrides.get("vocab_size", SIZES.get(size, {}).get("vocab_size")))
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = make_config(arch, size, len(tokenizer), special_ids, dict(config_overrides))
    rng_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # seed our weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        spread_init(model, tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(**special_ids)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **save_kwargs)
    return out


def default_tiny_model_dir(arch: str = "llama") -> Path:
    """Returns the cached default tiny checkpoint, building it once (into a temp dir, then an atomic rename)."""
    target = cache_root() / f"tiny-{arch}-v{TINY_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp, arch=arch)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its complete copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny %s checkpoint at %s", arch, target)
    return target


def ensure_model_dir(model: str) -> None:
    """Builds the default tiny checkpoint where `model` names it but this node lacks it (a fresh cluster node)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return
    for arch in SUPPORTED_TINY_ARCHS:
        if path == cache_root() / f"tiny-{arch}-v{TINY_FORMAT_VERSION}":
            default_tiny_model_dir(arch)
