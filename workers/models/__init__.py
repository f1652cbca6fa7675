"""Model registry: Hugging Face architecture name -> our implementation."""
from __future__ import annotations

from torch import nn

from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.bloom import BloomForCausalLM
from rayinfer.workers.models.cohere import CohereForCausalLM
from rayinfer.workers.models.falcon import FalconForCausalLM
from rayinfer.workers.models.gemma import GemmaForCausalLM
from rayinfer.workers.models.gemma2 import Gemma2ForCausalLM
from rayinfer.workers.models.gpt2 import GPT2LMHeadModel
from rayinfer.workers.models.gpt_bigcode import GPTBigCodeForCausalLM
from rayinfer.workers.models.gpt_neox import GPTNeoXForCausalLM
from rayinfer.workers.models.gptj import GPTJForCausalLM
from rayinfer.workers.models.llama import LlamaForCausalLM
from rayinfer.workers.models.mixtral import MixtralForCausalLM
from rayinfer.workers.models.olmo import OlmoForCausalLM
from rayinfer.workers.models.olmo2 import Olmo2ForCausalLM
from rayinfer.workers.models.opt import OPTForCausalLM
from rayinfer.workers.models.phi import PhiForCausalLM
from rayinfer.workers.models.phi3 import Phi3ForCausalLM
from rayinfer.workers.models.qwen2_moe import Qwen2MoeForCausalLM
from rayinfer.workers.models.qwen3 import Qwen3ForCausalLM
from rayinfer.workers.models.stablelm import StableLmForCausalLM
from rayinfer.workers.models.starcoder2 import Starcoder2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": LlamaForCausalLM,  # the multipliers come from ModelSpec
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
    "OlmoForCausalLM": OlmoForCausalLM,
    "StableLmForCausalLM": StableLmForCausalLM,
    "CohereForCausalLM": CohereForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTBigCodeForCausalLM": GPTBigCodeForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "BloomForCausalLM": BloomForCausalLM,
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
