"""Per-family rewrites of a checkpoint's config.json into the Llama-style keys `load_model_spec` reads.

Families that name their sizes differently (GPT-2's n_embd / n_head / n_layer, OPT's ffn_dim, ...) register a
function here that returns a copy of the config with the common keys filled in; the original keys stay, so a
model file can still read its own peculiarities from `ModelSpec.raw`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Config = dict[str, Any]

# model_type -> rewrite. Each returns a new dict; keys it does not know stay as they are.
CONFIG_NORMALIZERS: dict[str, Callable[[Config], Config]] = {}


def normalize_config(cfg: Config) -> Config:
    rewrite = CONFIG_NORMALIZERS.get(cfg.get("model_type", ""))
    return rewrite(dict(cfg)) if rewrite is not None else cfg


def renamed(cfg: Config, aliases: dict[str, str]) -> Config:
    """Copies each alias's value to its common name (alias -> common), unless the common key is already set."""
    out = dict(cfg)
    for alias, common in aliases.items():
        if alias in out and out.get(common) is None:
            out[common] = out[alias]
    return out


def _qwen2_moe(cfg: Config) -> Config:
    """Qwen2-MoE slides only with use_sliding_window, and then on the layers transformers' config marks: the even
    layers below max_window_layers (hub configs carry a sliding_window they do not use, and no layer_types)."""
    out = dict(cfg)
    if not out.get("use_sliding_window", False) or not out.get("sliding_window"):
        out["sliding_window"] = None
    elif out.get("layer_types") is None:
        layers, first_full = int(out["num_hidden_layers"]), int(out.get("max_window_layers", 28))
        out["layer_types"] = [
            "sliding_attention" if i % 2 == 0 and i < first_full else "full_attention" for i in range(layers)
        ]
    return out


CONFIG_NORMALIZERS["qwen2_moe"] = _qwen2_moe
