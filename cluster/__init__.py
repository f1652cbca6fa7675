"""The front doors of rayinfer: the offline `LLM` (and, with the serve extra, the Ray Serve app)."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages
from rayinfer.cluster.llm import LLM
from rayinfer.scheduler.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from rayinfer.scheduler.pooling_params import PoolingParams
from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams
from rayinfer.scheduler.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM", "BeamSearchParams", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "Logprob",
    "PoolingParams", "RequestOutput", "SamplingParams", "StructuredOutputsParams",
]
