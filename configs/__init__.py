"""rayinfer.configs."""

from rayinfer.configs.engine import EngineConfig, resolved_limits

__all__ = ["EngineConfig", "resolved_limits"]
