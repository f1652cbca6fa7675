"""rayinfer.workers."""
import rayinfer.configs.source_tree  # noqa: F401 - keeps a checkout's bare folders from shadowing PyPI packages
