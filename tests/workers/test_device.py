"""How many torch threads a CPU worker takes."""
from __future__ import annotations

import os

import pytest
import torch

from rayinfer.workers.device import use_cpu_cores


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_workers_split_all_cores(monkeypatch, restore_threads) -> None:
    monkeypatch.delenv("RAYINFER_CPU_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert use_cpu_cores(1) == cores == torch.get_num_threads()
    assert use_cpu_cores(2) == max(1, cores // 2)


def test_the_environment_overrides_the_count(monkeypatch, restore_threads) -> None:
    monkeypatch.setenv("RAYINFER_CPU_THREADS", "1")
    assert use_cpu_cores(1) == 1 == torch.get_num_threads()
    monkeypatch.setenv("RAYINFER_CPU_THREADS", "zero")
    with pytest.raises(ValueError, match="RAYINFER_CPU_THREADS must be a positive integer"):
        use_cpu_cores(1)
