"""rayinfer.workers."""
