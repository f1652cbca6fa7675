"""rayinfer.scheduler."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages

from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["BeamSearchParams", "SamplingParams"]
