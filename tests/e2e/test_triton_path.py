"""The whole model on its Triton kernels (forced; the interpreter runs them on CPU) equals transformers."""
from __future__ import annotations

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.kernels.triton_compat import HAS_TRITON

NEW_TOKENS = 24
PROMPTS = ["A", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village by the sea"]

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("mistral", {"sliding_window": 8, "num_key_value_heads": 1})],
    ids=["llama-gqa", "mistral-mqa-sliding"],
)
def test_triton_path_matches_transformers(arch: str, overrides: dict, tiny_checkpoint, hf_greedy, monkeypatch) -> None:
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    model_dir = tiny_checkpoint(arch, **overrides)
    # An 8-token budget with 4-token blocks: prompts split over steps, chunks cross block edges, decodes mix in.
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8, block_size=4)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_triton_path_seeded_sampling_equals_torch_path(llama_dir, monkeypatch) -> None:
    params = SamplingParams(seed=3, max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, ignore_eos=True)
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "torch")
    on_torch = LLM(str(llama_dir)).generate(PROMPTS, params, use_tqdm=False)
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    on_triton = LLM(str(llama_dir)).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on_triton] == [o.outputs[0].token_ids for o in on_torch]
