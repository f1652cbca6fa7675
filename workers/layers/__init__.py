"""rayinfer.workers.layers."""
