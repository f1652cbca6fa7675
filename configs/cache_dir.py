"""Where rayinfer keeps what it builds once per machine (the default tiny checkpoint, native CPU kernels)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RAYINFER_CACHE_DIR, else ~/.cache/rayinfer."""
    env = os.environ.get("RAYINFER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rayinfer"
