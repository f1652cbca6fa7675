"""The tiny models' shapes: the supported architectures, the size presets, and `make_config`, which turns an
(arch, size) pair plus overrides into the transformers config a random checkpoint is built from."""

from __future__ import annotations

from typing import Any

SUPPORTED_TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "gemma", "gemma2")
SUPPORTED_TINY_ARCHS += ("qwen2_moe", "mixtral")  # mixtures of experts
SUPPORTED_TINY_ARCHS += ("phi3", "starcoder2", "olmo", "stablelm", "cohere")
# Learned-position / ALiBi LayerNorm families: their configs take none of the Llama keys (rope, rms_norm_eps, KV heads).
_LAYER_NORM_ARCHS = ("gpt2", "gpt_bigcode", "opt", "bloom")
SUPPORTED_TINY_ARCHS += _LAYER_NORM_ARCHS
# LayerNorm families with partial rotary and parallel attention + MLP blocks (see _parallel_residual_kwargs).
PARALLEL_RESIDUAL_TINY_ARCHS = ("gptj", "gpt_neox", "falcon", "phi")
SUPPORTED_TINY_ARCHS += PARALLEL_RESIDUAL_TINY_ARCHS

# "tiny" keeps tests fast; "small" is big enough that batching/paging effects show up in benchmarks.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688
    ),
    # The CPU benchmark shape (issue 7): about 56M parameters, a Llama-2-sized vocabulary.
    "llama-56m": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408,
        vocab_size=32000,
    ),
    # Llama-3-8B's shape (8.0B parameters) for GPU benchmarks: build it with dtype bfloat16 on the GPU.
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
# Preset keys that are not plain config kwargs: the vocabulary sizes the tokenizer; rope_theta goes into
# rope_parameters.
_PRESET_ONLY_KEYS = ("vocab_size", "rope_theta")
INITIALIZER_RANGE = 0.1  # recorded in config.json; the weights themselves come from random_init.spread_init


def make_config(arch: str, size: str, vocab_size: int, special_ids: dict[str, int], overrides: dict[str, Any]) -> Any:
    """Builds the transformers config; `overrides` win over the size preset (e.g. num_key_value_heads=1)."""
    from transformers import (
        CohereConfig,
        FalconConfig,
        Gemma2Config,
        GemmaConfig,
        GPTJConfig,
        GPTNeoXConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        OlmoConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        StableLmConfig,
        Starcoder2Config,
    )

    if arch not in SUPPORTED_TINY_ARCHS:
        raise ValueError(f"Unknown tiny arch {arch!r}; choose one of {SUPPORTED_TINY_ARCHS}")
    if size not in SIZES:
        raise ValueError(f"Unknown tiny size {size!r}; choose one of {tuple(SIZES)}")
    if arch in _LAYER_NORM_ARCHS:
        return _make_layer_norm_config(arch, size, vocab_size, special_ids, overrides)
    preset = SIZES[size]
    kwargs: dict[str, Any] = dict(
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(preset.get("rope_theta", 10000.0))},
        **special_ids,
    )
    kwargs.update({k: v for k, v in preset.items() if k not in _PRESET_ONLY_KEYS}, vocab_size=vocab_size)
    if arch == "mistral":
        kwargs["sliding_window"] = None  # a 4096 window over a 512 context is a no-op; override to exercise it
    if arch in ("qwen2", "qwen3") and overrides.get("sliding_window") is not None:
        kwargs["use_sliding_window"] = True  # Qwen2 ignores sliding_window unless this flag is on
        kwargs["max_window_layers"] = 0  # ...and only applies it to layers >= max_window_layers
    if arch in ("gemma", "gemma2"):
        # Gemma's defaults are the 256-wide heads of the real models and tied embeddings (its checkpoints tie).
        head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        kwargs.update(head_dim=head_dim, tie_word_embeddings=True)
        if arch == "gemma2":  # its 4096 window is a no-op over a 512 context: override sliding_window to exercise it
            # Not head_dim, so a scale taken from head_dim shows; the sharper attention also keeps outputs varied.
            kwargs.update(query_pre_attn_scalar=head_dim // 2)
    if arch == "qwen2_moe":  # 4 experts, top-2, narrow routed experts beside a wider shared one and dense layers
        width = kwargs["intermediate_size"]
        kwargs.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=width // 4,
            shared_expert_intermediate_size=width // 2,
        )
    if arch == "mixtral":  # 4 experts of half the dense width, top-2; sliding_window stays null unless overridden
        kwargs.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=kwargs["intermediate_size"] // 2)
    if arch in ("starcoder2", "olmo", "stablelm", "cohere"):
        del kwargs["rms_norm_eps"]  # LayerNorm families: their own eps key (norm_epsilon, layer_norm_eps) or none
    if "rope_scaling" in overrides:  # legacy spelling: fold it into rope_parameters (transformers 5 style)
        scaling = dict(overrides.pop("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], **scaling}
    if "rope_theta" in overrides:
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "rope_theta": float(overrides.pop("rope_theta"))}
    if arch in PARALLEL_RESIDUAL_TINY_ARCHS:
        kwargs = _parallel_residual_kwargs(arch, kwargs)
    kwargs.update(overrides)
    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "granite": GraniteConfig,
        "olmo2": Olmo2Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "qwen2_moe": Qwen2MoeConfig,
        "mixtral": MixtralConfig,
        "phi3": Phi3Config,
        "starcoder2": Starcoder2Config,
        "olmo": OlmoConfig,
        "stablelm": StableLmConfig,
        "cohere": CohereConfig,
        "gptj": GPTJConfig,
        "gpt_neox": GPTNeoXConfig,
        "falcon": FalconConfig,
        "phi": PhiConfig,
    }[arch]
    return cls(**kwargs)


def _make_layer_norm_config(
    arch: str, size: str, vocab_size: int, special_ids: dict[str, int], overrides: dict[str, Any]
) -> Any:
    """GPT-2, GPT-BigCode, OPT and Bloom configs from the size preset (their own defaults otherwise: tied heads,
    GPT-2's n_inner None = 4 * hidden, BigCode's multi_query); `overrides` use each family's own keys."""
    from transformers import BloomConfig, GPT2Config, GPTBigCodeConfig, OPTConfig

    preset = SIZES[size]
    kwargs: dict[str, Any] = dict(
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        vocab_size=vocab_size,
        initializer_range=INITIALIZER_RANGE,
        **special_ids,
    )
    if arch != "bloom":  # ALiBi: no position table
        kwargs["max_position_embeddings"] = 512
    if arch == "opt":
        kwargs["ffn_dim"] = preset["intermediate_size"]
    cls = {"gpt2": GPT2Config, "gpt_bigcode": GPTBigCodeConfig, "opt": OPTConfig, "bloom": BloomConfig}[arch]
    for common, native in getattr(cls, "attribute_map", {}).items():
        if native in overrides:  # an override in the family's spelling (n_head=5) replaces the preset's value
            kwargs.pop(common, None)
    kwargs.update(overrides)
    return cls(**kwargs)


def _parallel_residual_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The common preset in each family's own config keys; Llama-only keys are dropped.

    Defaults exercise partial rotary (a quarter or half of each head) and untied heads; GQA/MQA, the residual
    styles and Falcon's layouts come from overrides."""
    kwargs = dict(kwargs)
    kv_heads = kwargs.pop("num_key_value_heads")
    kwargs.pop("rms_norm_eps")
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if arch == "gptj":  # n_* names; theta is fixed at 10000; rotary_dim counts features, GPT-J interleaved
        kwargs.pop("rope_parameters")
        renames = dict(
            hidden_size="n_embd", num_hidden_layers="n_layer", num_attention_heads="n_head",
            intermediate_size="n_inner", max_position_embeddings="n_positions",
        )
        kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
        kwargs.update(rotary_dim=head_dim // 4, layer_norm_epsilon=1e-5)  # a quarter, as GPT-J 6B (64 of 256)
    elif arch == "gpt_neox":
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "partial_rotary_factor": 0.25}
        kwargs.update(layer_norm_eps=1e-5)
    elif arch == "falcon":  # the new decoder architecture (GQA, ln_attn + ln_mlp); overrides select the old one
        kwargs["ffn_hidden_size"] = kwargs.pop("intermediate_size")
        kwargs.update(
            new_decoder_architecture=True, num_kv_heads=kv_heads, multi_query=True, parallel_attn=True, bias=False,
            alibi=False, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        )
    elif arch == "phi":
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "partial_rotary_factor": 0.5}
        kwargs.update(num_key_value_heads=kv_heads, layer_norm_eps=1e-5)
    return kwargs
