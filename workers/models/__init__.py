"""Model registry: Hugging Face architecture name -> our implementation."""
from __future__ import annotations

from torch import nn

from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class_for(spec: ModelSpec) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[spec.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"architecture {spec.architecture!r} is not supported; supported: {supported}") from None
