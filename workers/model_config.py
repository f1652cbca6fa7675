"""What the engine needs to know about a checkpoint, read from its config.json and generation_config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayinfer.workers.hf_config import normalize_config
from rayinfer.workers.parallel_state import pipeline_layer_ranges

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rot_dim: int
    kind: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_windows: tuple[int | None, ...]
    checkpoint_dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Scalar multipliers some families put in config.json (Granite); the defaults leave a model unchanged.
    embedding_multiplier: float = 1.0  # scales the token embeddings
    residual_multiplier: float = 1.0  # scales each sublayer's output before its residual add
    attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    logits_divisor: float = 1.0  # the logits are divided by it (Granite's logits_scaling)
    # tanh soft-capping (Gemma 2): scores become cap * tanh(score / cap); None: no cap.
    attn_logit_softcap: float | None = None  # on the scaled attention scores
    final_logit_softcap: float | None = None  # on the output logits
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_model_len_limit(self) -> int:
        """Longest context the checkpoint supports: linear and dynamic rope scaling stretch the trained length."""
        if self.rope.kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_spec(cfg: dict[str, Any], head_dim: int) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints write rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "dynamic", "llama3"):
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: default, linear, dynamic, llama3")
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return RopeSpec(
        theta=theta,
        rot_dim=int(head_dim * partial),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _attention_scale(cfg: dict[str, Any]) -> float | None:
    """Granite's attention_multiplier is the scale itself; Gemma 2's query_pre_attn_scalar replaces head_dim."""
    if cfg.get("attention_multiplier") is not None:
        return float(cfg["attention_multiplier"])
    if cfg.get("query_pre_attn_scalar") is not None:
        return float(cfg["query_pre_attn_scalar"]) ** -0.5
    return None


# Families whose sliding_window only applies with use_sliding_window, to the layers from max_window_layers on.
_QWEN_SLIDING = ("qwen2", "qwen3")


def _sliding_windows(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") in _QWEN_SLIDING and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if cfg.get("model_type") == "gemma2":  # configs written before layer_types: even layers slide
        return tuple(int(window) if i % 2 == 0 else None for i in range(num_layers))
    if cfg.get("model_type") in _QWEN_SLIDING:
        first_sliding = int(cfg.get("max_window_layers", num_layers))
        return tuple(window if i >= first_sliding else None for i in range(num_layers))
    return (int(window),) * num_layers


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ValueError(f"model: {model_dir} is not a Hugging Face checkpoint folder (no config.json)")
    cfg = normalize_config(_read_json(config_path))
    generation = _read_json(model_dir / "generation_config.json")
    architectures = cfg.get("architectures") or []
    if not architectures:
        raise ValueError(f"model: {config_path} names no architecture")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    num_layers = int(cfg["num_hidden_layers"])
    model_type = cfg.get("model_type", "")
    attention_bias = bool(cfg.get("attention_bias", False))
    qwen2 = model_type == "qwen2"
    eos = _ids(generation.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return ModelSpec(
        architecture=architectures[0],
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope=_rope_spec(cfg, head_dim),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if qwen2 else attention_bias,
        o_bias=False if qwen2 else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        # Gemma names the MLP activation hidden_activation (hidden_act is a legacy, less precise field there).
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
        sliding_windows=_sliding_windows(cfg, num_layers),
        checkpoint_dtype=_DTYPES.get(str(dtype_name), torch.float32),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=generation.get("bos_token_id", cfg.get("bos_token_id")),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        attention_scale=_attention_scale(cfg),
        logits_divisor=float(cfg.get("logits_scaling", 1.0)),
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping")),
        raw=cfg,
    )


# Architectures whose q/k RMSNorm spans every head of the projection: a rank holding some heads cannot compute it.
WHOLE_QK_NORM_ARCHITECTURES = ("Olmo2ForCausalLM",)


def check_tensor_parallel(spec: ModelSpec, tp_size: int) -> None:
    """Fails early, naming the shape, when the model cannot be split across `tp_size` ranks."""
    if tp_size == 1:
        return
    problems = []
    if spec.num_heads % tp_size:
        problems.append(f"num_attention_heads ({spec.num_heads})")
    kv = spec.num_kv_heads
    if kv % tp_size and tp_size % kv:
        problems.append(f"num_key_value_heads ({kv}) (must divide or be divisible by it)")
    if spec.intermediate_size % tp_size:
        problems.append(f"intermediate_size ({spec.intermediate_size})")
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):  # mixture-of-experts MLP widths
        if spec.raw.get(key) and int(spec.raw[key]) % tp_size:
            problems.append(f"{key} ({spec.raw[key]})")
    if spec.architecture in WHOLE_QK_NORM_ARCHITECTURES:
        raise ValueError(
            f"tensor_parallel_size {tp_size}: {spec.architecture} normalises q and k over all heads at once "
            "(q_norm/k_norm over the whole projection), which this engine does not split across ranks; "
            "use tensor_parallel_size 1"
        )
    if problems:
        raise ValueError(
            f"tensor_parallel_size {tp_size} cannot split this model: {', '.join(problems)} "
            f"not divisible by {tp_size}"
        )


# The architectures whose classes build one pipeline stage (the Llama-based ones: `supports_pipeline_parallel` on
# their class; tests check the two agree). Kept here as names so the engine can check without importing models.
PIPELINE_PARALLEL_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GraniteForCausalLM",
    "Olmo2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
    "Phi3ForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM", "StableLmForCausalLM", "CohereForCausalLM",
)


def check_pipeline_parallel(spec: ModelSpec, pp_size: int, partition: list[int] | None = None) -> None:
    """Fails early when the model cannot be cut into `pp_size` stages (as `partition` says, if given): an
    architecture without stage support, or a split that does not fit its layers."""
    pipeline_layer_ranges(spec.num_layers, pp_size, partition)
    if pp_size > 1 and spec.architecture not in PIPELINE_PARALLEL_ARCHITECTURES:
        raise ValueError(
            f"pipeline_parallel_size {pp_size}: {spec.architecture} cannot be split into pipeline stages in this "
            f"engine (supported: {', '.join(PIPELINE_PARALLEL_ARCHITECTURES)}); use pipeline_parallel_size 1"
        )


def stop_token_ids(spec: ModelSpec, tokenizer: Any) -> frozenset[int]:
    """The ids that end a sequence on this model (unless a request ignores EOS): the checkpoint's EOS ids (config
    and generation config) and the tokenizer's. The end of a structured output's grammar allows only these."""
    ids = set(spec.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
