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


# --- Llama-shaped variants (Phi-3, Starcoder2, OLMo, StableLM, Cohere): their LayerNorm eps and bias keys. ---
def normalize_phi3_config(cfg: Config) -> Config:
    """Phi-3's LongRoPE (rope_scaling type longrope, or its old names su / yarn) picks short or long frequency
    factors by sequence length; this engine does not implement it, so such a config is refused here, by name."""
    for key in ("rope_scaling", "rope_parameters"):
        kind = (cfg.get(key) or {}).get("rope_type") or (cfg.get(key) or {}).get("type")
        if kind not in (None, "default"):
            raise ValueError(
                f"rope_scaling ({key}) type {kind!r} (LongRoPE) is not supported for Phi-3; only rope_type "
                "'default' is"
            )
    return cfg


def _layer_norm_eps(cfg: Config, key: str) -> Config:
    """The family's own LayerNorm eps (transformers' default 1e-5) as the common eps; it wins over any stray
    rms_norm_eps, which these families' modeling code never reads."""
    value = cfg.get(key)
    return {**cfg, "rms_norm_eps": 1e-5 if value is None else float(value)}


def normalize_starcoder2_config(cfg: Config) -> Config:
    use_bias = bool(cfg.get("use_bias", True))  # transformers' default: every projection has a bias
    return {**_layer_norm_eps(cfg, "norm_epsilon"), "attention_bias": use_bias, "mlp_bias": use_bias}


def normalize_olmo_config(cfg: Config) -> Config:
    return {**cfg, "rms_norm_eps": 1e-5}  # OLMo v1's LayerNorm eps is a constant in transformers, not a config key


def normalize_stablelm_config(cfg: Config) -> Config:
    out = _layer_norm_eps(cfg, "layer_norm_eps")
    params = out.get("rope_parameters") or {}
    if "partial_rotary_factor" not in params and "partial_rotary_factor" not in out:
        out["partial_rotary_factor"] = 0.25  # transformers' default for StableLM
    return out


CONFIG_NORMALIZERS["phi3"] = normalize_phi3_config
CONFIG_NORMALIZERS["starcoder2"] = normalize_starcoder2_config
CONFIG_NORMALIZERS["olmo"] = normalize_olmo_config
CONFIG_NORMALIZERS["stablelm"] = normalize_stablelm_config
CONFIG_NORMALIZERS["cohere"] = lambda cfg: _layer_norm_eps(cfg, "layer_norm_eps")


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
