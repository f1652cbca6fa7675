"""Triton, when this platform has it. Kernel modules import `triton`/`tl` from here so they still import
(and their torch references still work) where Triton is not installed."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without Triton wheels
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for the triton module: decorating works, launching raises."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    triton = _MissingTriton()
    tl = None

__all__ = ["HAS_TRITON", "tl", "triton"]
