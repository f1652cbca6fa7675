"""Model registry: Hugging Face architecture name -> our implementation."""
from __future__ import annotations

from torch import nn

from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.gemma import GemmaForCausalLM
from rayinfer.workers.models.gemma2 import Gemma2ForCausalLM
from rayinfer.workers.models.llama import LlamaForCausalLM
from rayinfer.workers.models.olmo2 import Olmo2ForCausalLM
from rayinfer.workers.models.qwen3 import Qwen3ForCausalLM
from rayinfer.workers.models.falcon import FalconForCausalLM
from rayinfer.workers.models.gpt_neox import GPTNeoXForCausalLM
from rayinfer.workers.models.gptj import GPTJForCausalLM
from rayinfer.workers.models.phi import PhiForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": LlamaForCausalLM,  # the multipliers come from ModelSpec
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "GPTJForCausalLM": GPTJForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
}


def model_class_for(spec: ModelSpec) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[spec.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"architecture {spec.architecture!r} is not supported; supported: {supported}") from None
