"""rayinfer.configs."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages

from rayinfer.configs.engine import EngineConfig, resolved_limits

__all__ = ["EngineConfig", "resolved_limits"]
