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


# --- GPT-J, GPT-NeoX, Falcon, Phi (workers/models/parallel_residual.py). Each fills the common keys from the
# family's own names and transformers' defaults for the keys a config.json may leave out.
def _gptj(cfg: Config) -> Config:
    out = renamed(cfg, {
        "n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
        "n_positions": "max_position_embeddings", "n_inner": "intermediate_size", "activation_function": "hidden_act",
    })
    if out.get("intermediate_size") is None:  # n_inner None: 4 * n_embd
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    out.setdefault("hidden_act", "gelu_new")
    return out


def _gpt_neox(cfg: Config) -> Config:
    out = dict(cfg)
    params = {**(out.get("rope_scaling") or {}), **(out.get("rope_parameters") or {})}
    if "partial_rotary_factor" not in params and out.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = out.get("rotary_pct", 0.25)  # older configs: rotary_pct
    if "rope_theta" not in params and out.get("rope_theta") is None:
        out["rope_theta"] = out.get("rotary_emb_base", 10000.0)
    out.setdefault("hidden_act", "gelu")
    return out


def _falcon(cfg: Config) -> Config:
    out = renamed(cfg, {
        "n_embed": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
        "ffn_hidden_size": "intermediate_size", "activation": "hidden_act",
    })
    heads = int(out["num_attention_heads"])
    if out.get("intermediate_size") is None:
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    out.setdefault("hidden_act", "gelu")
    out.setdefault("tie_word_embeddings", True)  # transformers' Falcon default
    if out.get("new_decoder_architecture", False):
        out["num_key_value_heads"] = out.get("num_kv_heads") or heads
    else:  # the old layout: one shared KV head (multi_query, the default) or one per head
        out["num_key_value_heads"] = 1 if out.get("multi_query", True) else heads
    return out


def _phi(cfg: Config) -> Config:
    out = dict(cfg)
    params = {**(out.get("rope_scaling") or {}), **(out.get("rope_parameters") or {})}
    if "partial_rotary_factor" not in params and out.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = 0.5  # transformers' Phi default
    out.setdefault("hidden_act", "gelu_new")
    return out


CONFIG_NORMALIZERS.update(gptj=_gptj, gpt_neox=_gpt_neox, falcon=_falcon, phi=_phi)
