"""rayinfer.scheduler."""

from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["BeamSearchParams", "SamplingParams"]
