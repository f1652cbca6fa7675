"""Reads a Hugging Face checkpoint folder's safetensors files (single or sharded with an index), lazily: each
tensor is a handle that a parameter's loader narrows to its own shard, so a rank reads only what it holds.

Its own module because model layers name `CheckpointTensor` in their loaders while the weight loader builds
those layers: with the reader here, neither imports the other.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {model_dir}")
    return files


class CheckpointTensor:
    """A tensor in a safetensors file, read only as far as a loader asks: a rank reads its shard, not the whole."""

    def __init__(self, name: str, file_slice: object) -> None:
        self.name = name
        self._slice = file_slice
        self.shape = tuple(file_slice.get_shape())
        self.num_elements_read = 0

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        part = self._slice[index]
        self.num_elements_read += part.numel()
        return part

    def full(self) -> torch.Tensor:
        if not self.shape:  # a scalar (an FP8 per-tensor scale) has no dim to narrow
            part = self._slice[()]
            self.num_elements_read += 1
            return part
        return self.narrow(0, 0, self.shape[0])


def iter_checkpoint_tensors(model_dir: str | Path) -> Iterator[tuple[str, CheckpointTensor]]:
    """Every tensor of the checkpoint, unread: its loader reads what it needs while the file is open."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, CheckpointTensor(name, f.get_slice(name))


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name of the checkpoint, without reading any tensor."""
    names: list[str] = []
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names
