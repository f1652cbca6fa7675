"""The built-in demo model, `rayinfer-demo`: a small Llama trained on Python's own documentation
(`scripts/train_demo_model.py`), shipped as package data so that `LLM()` and `rayinfer serve` work with no model
given and nothing downloaded. It writes Python-docs-like English; BENCHMARKS.md has its held-out perplexity."""
from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "rayinfer-demo"


def demo_model_dir() -> Path:
    """The checkpoint folder inside the installed package (config, safetensors, tokenizer)."""
    return Path(__file__).resolve().parent / "checkpoint"
