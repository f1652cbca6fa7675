"""The backend switch: Triton for CUDA tensors, the reference for CPU ones, or whatever the variable forces."""
from __future__ import annotations

import pytest
import torch

from rayinfer import kernels
from rayinfer.kernels.dispatch import dispatched, kernel_backend


def test_cpu_tensors_use_the_reference_unless_forced(monkeypatch) -> None:
    x = torch.zeros(2)
    monkeypatch.delenv("RAYINFER_KERNEL_BACKEND", raising=False)
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    assert kernel_backend(x) == "triton"
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "torch")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RAYINFER_KERNEL_BACKEND must be 'triton' or 'torch'"):
        kernel_backend(x)


def test_dispatched_calls_the_chosen_implementation(monkeypatch) -> None:
    def thing_reference(x: torch.Tensor) -> str:
        return "reference"

    op = dispatched(thing_reference, lambda x: "triton")
    assert op.__name__ == "thing"
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    assert op(torch.zeros(1)) == "triton"
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "torch")
    assert op(torch.zeros(1)) == "reference"


def test_forced_triton_rms_norm_matches_reference(monkeypatch) -> None:
    x, w = torch.randn(3, 64), torch.randn(64)
    expected = kernels.norm.rms_norm_reference(x, w, 1e-6)
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), expected)
