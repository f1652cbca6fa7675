"""Shared fixtures: tiny checkpoints built once per session, and transformers as the reference."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rayinfer.cluster.tiny_model import build_tiny_checkpoint  # noqa: E402
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_built: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Returns a builder: tiny_checkpoint(arch, **overrides) -> folder, cached for the session."""

    def build(arch: str = "llama", size: str = "tiny", **overrides: Any) -> Path:
        key = (arch, size, repr(sorted(overrides.items())))
        if key not in _built:
            out = tmp_path_factory.mktemp(f"{arch}-{size}")
            _built[key] = build_tiny_checkpoint(out, arch=arch, size=size, **overrides)
        return _built[key]

    return build


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (4 CPU slots: two TP=2 engines side by side)."""
    ray = pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def hf_llama(llama_dir: Path):
    """transformers' model of the tiny Llama checkpoint, float32, for tests that compare logits with it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def stream_deltas():
    """Returns run(engine, params) -> (deltas, final output): steps the engine to the end, passing every output
    of its (single) request through a DeltaTracker as a streaming client would see it."""
    from rayinfer.scheduler.output_stream import DeltaTracker

    def run(engine, params):
        tracker, deltas, final = DeltaTracker(params), [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                delta = tracker.delta(out)
                if delta is not None:
                    deltas.append(delta)
                final = out
        return deltas, final

    return run


@pytest.fixture(scope="session")
def hf_greedy():
    """transformers' greedy continuation of each prompt (see `_hf_greedy`), the reference every engine test uses."""
    return _hf_greedy


def _hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_new_tokens: int, attn_implementation: str | None = None
) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, run one prompt at a time (no padding), in float32.

    attn_implementation: passed to from_pretrained when given (Gemma 2's soft-capping needs "eager")."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                eos_token_id=None,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests need CUDA; without it they are skipped with the reason shown."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
