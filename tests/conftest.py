"""Shared fixtures: tiny checkpoints built once per session, and transformers as the reference."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402
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
    """Returns run(engine, params) -> (deltas, final output): steps the engine to the end, keeping every delta of
    its (single) request as a streaming client sees it, and the whole output assembled from them."""
    from rayinfer.scheduler.outputs import OutputAssembler

    def run(engine, params):
        assembler, deltas, final = OutputAssembler(), [], None
        while engine.has_unfinished_requests():
            for delta in engine.step():
                deltas.append(delta)
                final = assembler.add(delta) or final
        return deltas, final

    return run


@pytest.fixture(scope="session")
def run_to_end():
    """Returns run(engine, earlier=(), max_steps=None) -> {request_id: whole output}: steps the engine until no
    request is left, assembling each finished request's output from its deltas (after `earlier`, deltas the caller
    already took); past `max_steps` steps it fails instead of looping on."""
    from rayinfer.scheduler.outputs import OutputAssembler

    def run(engine, earlier=(), max_steps=None):
        assembler, finals, steps = OutputAssembler(), {}, 0

        def add(deltas):
            for delta in deltas:
                output = assembler.add(delta)
                if output is not None:
                    finals[output.request_id] = output

        add(earlier)
        while engine.has_unfinished_requests():
            steps += 1
            assert max_steps is None or steps <= max_steps, f"requests still unfinished after {max_steps} steps"
            add(engine.step())
        return finals

    return run


# Varied lengths and scripts; the longer ones exceed 16 tokens, so a 16-token step budget splits their prefill.
COVERAGE_PROMPT_TEXTS = (
    "A",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman",
    "café naïve 日本語 🙂",
    "Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted.",
)


@pytest.fixture(scope="session")
def coverage_prompts():
    """Returns prompts(model_dir) -> the token ids of COVERAGE_PROMPT_TEXTS under the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    def prompts(model_dir: Path) -> list[list[int]]:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return [tokenizer.encode(text) for text in COVERAGE_PROMPT_TEXTS]

    return prompts


@pytest.fixture(scope="session")
def rayinfer_greedy():
    """Returns generate(model_dir, prompts, max_tokens, **engine_args) -> our greedy tokens per prompt (float32, one
    batch, ignore_eos), after checking that every KV block went back to the pool."""
    from rayinfer.cluster import LLM, SamplingParams

    def generate(model_dir: Path, prompts: list[list[int]], max_tokens: int, **engine_args: Any) -> list[list[int]]:
        llm = LLM(str(model_dir), dtype="float32", **engine_args)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks, "KV blocks leaked"
        finally:
            llm.shutdown()  # a Ray engine's workers give their CPU slots back for the next engine
        return [out.outputs[0].token_ids for out in outputs]

    return generate


def assert_varied(name: str, reference: list[list[int]]) -> None:
    """Random tiny models can collapse into repeating a token, which would hide bugs: the reference must vary."""
    distinct = {t for out in reference for t in out}
    assert len(distinct) > 30, f"{name}: reference output collapsed to {len(distinct)} distinct tokens"
    assert all(len(set(out)) > 4 for out in reference), f"{name}: a continuation repeats itself: {reference}"


COVERAGE_NEW_TOKENS = 24


@pytest.fixture(scope="session")
def greedy_matches_transformers(tiny_checkpoint, hf_greedy, coverage_prompts, rayinfer_greedy):
    """Returns check(name, arch, overrides, architecture, attn_implementation=None, **engine_args): a tiny `arch`
    checkpoint (config `overrides`) names `architecture`, transformers' greedy output over the coverage prompts
    varies, and ours (with `engine_args`, e.g. tensor parallelism on Ray) equals it token for token over
    COVERAGE_NEW_TOKENS, with a 16-token step budget splitting the prompts."""

    def check(
        name: str,
        arch: str,
        overrides: dict,
        architecture: str,
        attn_implementation: str | None = None,
        **engine_args: Any,
    ) -> None:
        model_dir = tiny_checkpoint(arch, **overrides)
        config = json.loads((model_dir / "config.json").read_text())
        assert config["architectures"] == [architecture]
        prompts = coverage_prompts(model_dir)
        assert max(len(p) for p in prompts) > 16  # the budget below splits the longer prompts across steps
        reference = hf_greedy(model_dir, prompts, COVERAGE_NEW_TOKENS, attn_implementation=attn_implementation)
        assert_varied(name, reference)
        ours = rayinfer_greedy(model_dir, prompts, COVERAGE_NEW_TOKENS, max_num_batched_tokens=16, **engine_args)
        assert ours == reference

    return check


@pytest.fixture(scope="session")
def varied():
    """The assert_varied check, as a fixture (test modules cannot import each other in importlib mode)."""
    return assert_varied


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
