"""Chooses, per call, between an op's Triton kernel, its torch reference and, for some ops, a CPU path.

Triton runs for CUDA tensors; CPU tensors take the op's CPU path where it has one (native C kernels that fall
back to the reference themselves), else the reference. RAYINFER_KERNEL_BACKEND=triton|torch forces one (triton on
CPU tensors works under TRITON_INTERPRET=1, which is how CI checks the kernels; torch means the plain reference).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from rayinfer.kernels.triton_compat import HAS_TRITON

ENV_VAR = "RAYINFER_KERNEL_BACKEND"
F = TypeVar("F", bound=Callable[..., Any])


def kernel_backend(x: torch.Tensor) -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed")
        return "triton"
    if forced:
        raise ValueError(f"{ENV_VAR} must be 'triton' or 'torch' (got {forced!r})")
    return "triton" if x.is_cuda and HAS_TRITON else "torch"


def dispatched(reference: F, triton_impl: F, cpu_impl: F | None = None) -> F:
    """One op: the first positional tensor argument decides which implementation runs."""

    @functools.wraps(reference)
    def op(*args: Any, **kwargs: Any) -> Any:
        if kernel_backend(args[0]) == "triton":
            impl = triton_impl
        elif cpu_impl is not None and args[0].device.type == "cpu" and not os.environ.get(ENV_VAR, "").strip():
            impl = cpu_impl
        else:
            impl = reference
        return impl(*args, **kwargs)

    op.__name__ = reference.__name__.removesuffix("_reference")
    return op  # type: ignore[return-value]
