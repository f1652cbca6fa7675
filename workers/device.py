"""Which device and dtype a worker runs on."""
from __future__ import annotations

import os

import torch

from rayinfer.workers.model_config import ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow or missing on most CPUs
    return spec.checkpoint_dtype if spec.checkpoint_dtype != torch.float32 else torch.bfloat16


def use_cpu_cores(world_size: int) -> int:
    """Gives a CPU worker its share of this machine's cores as torch threads; returns the thread count.

    A Ray actor that reserved one logical CPU starts with OMP_NUM_THREADS=1, which would leave a CPU engine
    computing on one core of many. The workers of one engine split all the cores the process may run on
    (RAYINFER_CPU_THREADS overrides the count). Measured serving llama-56m on the 2-core machine at 3 requests/s:
    a worker with both cores had p99 TTFT 317-417 ms and p99 TPOT 66-82 ms, against 763 ms and 129 ms with one
    core and the other left to Serve's proxy, the ingress and the scheduler loop (BENCHMARKS.md, serving)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, world_size))
    forced = os.environ.get("RAYINFER_CPU_THREADS", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"RAYINFER_CPU_THREADS must be a positive integer (got {forced!r})")
        threads = int(forced)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
