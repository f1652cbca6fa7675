"""Random weights for the tiny checkpoints: per-matrix scales and `spread_init`, which redraws a fresh model so
greedy outputs vary with the prompt and weight-loading or KV-cache bugs show up as changed tokens."""

from __future__ import annotations

import math
from typing import Any

from rayinfer.workers.tiny_checkpoint.architectures import PARALLEL_RESIDUAL_TINY_ARCHS

# Per-matrix gains for std = gain / sqrt(fan_in), so every size behaves alike. Sharper-than-default q/k make
# attention pick out particular earlier tokens, so outputs depend on context and KV-cache bugs change tokens;
# much sharper (gain 3) amplifies float32 rounding 10x, and a large o_proj over diffuse attention makes loops.
_GAINS = {"q_proj": 1.5, "k_proj": 1.5, "v_proj": 1.5, "o_proj": 1.0, "lm_head": 2.0}
# Mixture-of-experts routers: logits of std ~2 give each token a clear top-k (no near-ties that rounding could
# flip) while different tokens still pick different experts.
_ROUTER_GAIN = 2.0
_GAINS["qkv_proj"] = 1.5  # Phi-3's fused q/k/v
# Fused q/k/v projections (GPT-2's and GPT-BigCode's c_attn, GPT-NeoX's and Falcon's query_key_value) as q/k/v.
_GAINS.update(c_attn=1.5, query_key_value=1.5)
# Sharper query_key_value for Bloom (ALiBi is its only position signal) and GPT-NeoX (rotary on a quarter of each
# head): their random greedy outputs otherwise settle into short loops.
_MODEL_TYPE_GAINS = {"bloom": {"query_key_value": 2.0}, "gpt_neox": {"query_key_value": 2.0}}
_DEFAULT_GAIN = 1.0
_BIAS_STD = 0.2  # non-zero biases and norm weights, so forgetting to load one of them changes the output
_NORM_STD = 0.2
_QK_NORM_CENTER = 2.0
_EMBED_STD = 1.0
_SCALED_TIED_EMBED_SHRINK = 16.0  # see spread_init: tied heads of models that scale their embeddings (Gemma)
_TIED_FINAL_NORM_STD = 1.0
_EOS_ROW_SCALE = 0.05  # EOS logit ~0 while the top logit is ~3 std up: random generations rarely stop early
_PER_HEAD_QK_NORM = "_layernorm.norms."  # StableLM's per-head q/k LayerNorms (q_layernorm.norms.<h>)
# Tied Phi-3, Starcoder2 and StableLM models loop on a token or two even with the shrunk shared rows of spread_init:
# shrink them further (a smaller input embedding) and grow the final norm by as much, so the logits keep their spread.
_EXTRA_SHRUNK_TIED_EMBED_MODEL_TYPES = ("phi3", "starcoder2", "stablelm")
_TIED_EMBED_EXTRA_SHRINK = 4.0


def _gain(model_type: str, leaf: str) -> float:
    return _MODEL_TYPE_GAINS.get(model_type, {}).get(leaf) or _GAINS.get(leaf, _DEFAULT_GAIN)


def spread_init(model: Any, eos_id: int) -> None:
    """Re-initialises every weight so greedy decoding wanders, depends on context, and has clear argmaxes.

    HF's default (std 0.02, unit norms, zero biases) gives near-flat logits that loop on one or two tokens.
    """
    import torch

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, _EMBED_STD)
            elif isinstance(module, torch.nn.Linear):
                if leaf == "lm_head" and tied:
                    if module.bias is not None:  # GPT-J, Phi: the head's own bias is not shared
                        module.bias.normal_(0.0, _BIAS_STD)
                    continue  # shares the embedding; scaled below
                gain = _gain(model.config.model_type, leaf)
                module.weight.normal_(0.0, gain / math.sqrt(module.in_features))
                if module.bias is not None:
                    module.bias.normal_(0.0, _BIAS_STD)
            elif leaf == "experts" and isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
                # transformers' stacked experts: [E, 2I, H] gate/up and [E, H, I] down, fan-in last.
                for param in (module.gate_up_proj, module.down_proj):
                    param.normal_(0.0, _DEFAULT_GAIN / math.sqrt(param.shape[-1]))
            elif leaf == "gate" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
                module.weight.normal_(0.0, _ROUTER_GAIN / math.sqrt(module.weight.shape[1]))  # an MoE router
            elif type(module).__name__ == "Conv1D":  # GPT-2's linear, weight stored [in, out]
                module.weight.normal_(0.0, _gain(model.config.model_type, leaf) / math.sqrt(module.weight.shape[0]))
                module.bias.normal_(0.0, _BIAS_STD)
            elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                # q/k norms (Qwen3, Olmo2, Phi, StableLM's per-head ones) undo the q/k gains above; larger weights
                # restore the sharp attention.
                qk_norm = leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") or _PER_HEAD_QK_NORM in name
                center = _QK_NORM_CENTER if qk_norm else 1.0
                offset = 1.0 if type(module).__name__.startswith("Gemma") else 0.0  # Gemma scales by 1 + weight
                module.weight.normal_(center - offset, _NORM_STD * center)
                if getattr(module, "bias", None) is not None:  # LayerNorm: a bias left unloaded must show
                    module.bias.normal_(0.0, _BIAS_STD)
        head = model.get_output_embeddings().weight
        if tied and model.config.model_type in PARALLEL_RESIDUAL_TINY_ARCHS:
            # The input embeddings of these LayerNorm models are the whole residual stream's start: shared rows as
            # large as the head needs make the head echo the current token. Shrink them further and scale the
            # final LayerNorm up by as much, so the logits keep their spread.
            shrink = _SCALED_TIED_EMBED_SHRINK
            head.mul_(_GAINS["lm_head"] / math.sqrt(head.shape[1]) / shrink)
            final_norm = _final_layer_norm(model)
            final_norm.weight.mul_(shrink)
            final_norm.bias.mul_(shrink)
        elif tied:  # unit-std rows would give logits of std sqrt(hidden): far too peaked for sampling tests
            head.mul_(_GAINS["lm_head"] / math.sqrt(head.shape[1]))
            # Gemma multiplies the embeddings by sqrt(hidden): so large an input makes the tied head echo the
            # current token (greedy output loops on it). Shrink the shared rows (beyond undoing that factor) and
            # grow the final norm's scale by as much, so the logits keep their spread.
            embed_scale = float(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0))
            final_norm = getattr(model.base_model, "norm", None)
            if embed_scale != 1.0 and final_norm is not None:
                shrink = embed_scale * _SCALED_TIED_EMBED_SHRINK
                head.div_(shrink)
                offset = 1.0 if type(final_norm).__name__.startswith("Gemma") else 0.0
                final_norm.weight.add_(offset).mul_(shrink).sub_(offset)
            if model.config.model_type in _EXTRA_SHRUNK_TIED_EMBED_MODEL_TYPES and final_norm is not None:
                _shrink_tied_embeddings(head, final_norm)
            # Bloom normalises the embeddings, so the residual stream carries the current token's (tied) row at
            # full scale and the head echoes it. Final-norm weights of random sign break that alignment.
            embed_norm = getattr(model.base_model, "word_embeddings_layernorm", None)
            if embed_norm is not None:
                model.base_model.ln_f.weight.normal_(0.0, _TIED_FINAL_NORM_STD)
        head[eos_id].mul_(_EOS_ROW_SCALE)


def _shrink_tied_embeddings(head: Any, final_norm: Any) -> None:
    head.div_(_TIED_EMBED_EXTRA_SHRINK)
    final_norm.weight.mul_(_TIED_EMBED_EXTRA_SHRINK)
    if getattr(final_norm, "bias", None) is not None:
        final_norm.bias.mul_(_TIED_EMBED_EXTRA_SHRINK)


def _final_layer_norm(model: Any) -> Any:
    """The LayerNorm before the head, under each parallel-residual family's own name."""
    base = model.base_model
    for name in ("ln_f", "final_layer_norm", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"{type(model).__name__}: no final LayerNorm found")
