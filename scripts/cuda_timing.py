"""Timing for the benchmark scripts beside this file: CUDA events on a GPU, the wall clock on a CPU."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 40) -> float:
    """Median of CUDA-event timings of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], object], warmup: int = 2, iters: int = 7) -> float:
    """Median wall-clock time of `fn` on the CPU, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
