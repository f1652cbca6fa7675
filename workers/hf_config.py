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


# --- Absolute-position / LayerNorm families (GPT-2, GPT-BigCode, OPT, Bloom) ---------------------------------------
_GPT2_ALIASES = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
                 "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


def _gpt2_style(cfg: Config) -> Config:
    out = renamed(cfg, _GPT2_ALIASES)
    if out.get("intermediate_size") is None:  # n_inner None means 4 * n_embd
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    out["num_key_value_heads"] = int(out["num_attention_heads"])
    return out


def _gpt_bigcode(cfg: Config) -> Config:
    out = _gpt2_style(cfg)
    if out.get("multi_query", True):  # one K/V head shared by every query head
        out["num_key_value_heads"] = 1
    return out


def _opt(cfg: Config) -> Config:
    out = renamed(cfg, {"ffn_dim": "intermediate_size"})
    out["num_key_value_heads"] = int(out["num_attention_heads"])
    return out


def _bloom(cfg: Config) -> Config:
    out = renamed(cfg, {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers"})
    if out.get("n_embed") is not None:  # older checkpoints (bloom-560m...): n_embed wins, as in BloomConfig
        out["hidden_size"] = out["n_embed"]
    out["intermediate_size"] = 4 * int(out["hidden_size"])
    out["num_key_value_heads"] = int(out["num_attention_heads"])
    return out


CONFIG_NORMALIZERS.update({"gpt2": _gpt2_style, "gpt_bigcode": _gpt_bigcode, "opt": _opt, "bloom": _bloom})
