"""The front doors of rayinfer: the offline `LLM` (and, with the serve extra, the Ray Serve app)."""
from rayinfer.cluster.llm import LLM
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput
from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "RequestOutput", "SamplingParams"]
