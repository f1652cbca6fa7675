"""Embeddings (`LLM.embed`, `PoolingParams`) equal transformers' last hidden state at the last token, L2-normalised,
within 1e-5 in float32; they run through the engine beside generation and leave every KV block free."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, PoolingParams, SamplingParams
from rayinfer.scheduler.request_errors import InvalidRequestError

TOL = 1e-5
TEXTS = [
    "A",
    "Hello world",
    "Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted. An inference "
    "engine schedules requests, batches them together, and keeps a cache of keys and values.",
]


def _reference(model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    return torch.nn.functional.normalize(hidden.float(), dim=-1)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    # A budget of 8 tokens splits the long prompt into chunks that run beside other requests' tokens.
    return LLM(str(llama_dir), dtype="float32", max_num_batched_tokens=8, enable_prefix_caching=True)


def _assert_matches(outputs, hf_model) -> None:
    for output in outputs:
        got = torch.tensor(output.outputs.embedding)
        want = _reference(hf_model, output.prompt_token_ids)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=TOL, rtol=0), (output.prompt_token_ids, (got - want).abs().max())
        assert abs(float(got.norm()) - 1.0) < 1e-5


def test_embed_strings_ids_and_batches_equal_transformers(llm: LLM, hf_llama) -> None:
    tokenizer = llm.get_tokenizer()
    prompts = [*TEXTS, {"prompt_token_ids": tokenizer.encode("token ids, given directly")}]
    outputs = llm.embed(prompts, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs[:3]] == [tokenizer.encode(t) for t in TEXTS]
    assert len(outputs[2].prompt_token_ids) > 8  # prefilled in several chunks
    _assert_matches(outputs, hf_llama)
    single = llm.embed(TEXTS[1], use_tqdm=False)
    assert torch.allclose(torch.tensor(single[0].outputs.embedding), torch.tensor(outputs[1].outputs.embedding), atol=TOL)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_embed_from_the_prefix_cache_equals_a_fresh_run(llm: LLM, hf_llama) -> None:
    first = llm.embed(TEXTS[2], use_tqdm=False)[0]
    hits = llm.engine.block_manager.num_prefix_hits
    again = llm.embed(TEXTS[2], use_tqdm=False)[0]
    assert llm.engine.block_manager.num_prefix_hits > hits  # its prompt's blocks came from the cache
    assert torch.allclose(torch.tensor(again.outputs.embedding), torch.tensor(first.outputs.embedding), atol=TOL)
    _assert_matches([again], hf_llama)


def test_embedding_requests_run_beside_generation(llm: LLM, hf_llama, run_to_end) -> None:
    engine = llm.engine
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    alone = llm.generate([TEXTS[1]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("gen", TEXTS[1], greedy)
    engine.add_request("emb", TEXTS[2], PoolingParams())
    outputs = run_to_end(engine)
    assert outputs["gen"].outputs[0].token_ids == alone
    assert outputs["emb"].outputs == [] and outputs["emb"].finished
    want = _reference(hf_llama, tokenizer.encode(TEXTS[2]))
    assert torch.allclose(torch.tensor(outputs["emb"].embedding), want, atol=TOL, rtol=0)
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM, hf_llama) -> None:
    ids = llm.get_tokenizer().encode(TEXTS[2])
    output = llm.embed(TEXTS[2], PoolingParams(truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert output.prompt_token_ids == ids[-5:]
    _assert_matches([output], hf_llama)


def test_bad_embedding_requests_are_refused_naming_the_field(llm: LLM) -> None:
    too_long = {"prompt_token_ids": [7] * (llm.engine.max_model_len + 1)}
    with pytest.raises(InvalidRequestError, match="max_model_len") as info:
        llm.embed(too_long, use_tqdm=False)
    assert info.value.field == "input"
    # A prompt may fill the whole context: no output token follows it.
    full = llm.embed({"prompt_token_ids": [7] * llm.engine.max_model_len}, use_tqdm=False)[0]
    assert len(full.outputs.embedding) == llm.engine.model_spec.hidden_size
    with pytest.raises(InvalidRequestError) as info:
        PoolingParams(truncate_prompt_tokens=0)
    assert info.value.field == "truncate_prompt_tokens"
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_other_families_equal_transformers(tiny_checkpoint, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(arch)
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=8)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        _assert_matches(llm.embed(TEXTS, use_tqdm=False), hf_model)
    finally:
        llm.shutdown()
