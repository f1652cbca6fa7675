"""Logprobs and prompt logprobs equal transformers' log_softmax of its float32 logits (raw: before penalties,
temperature, top-k/p and logit_bias); logit_bias and allowed_token_ids steer the draw; bad values are refused."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, Logprob, RequestOutput, SamplingParams

TOL = 1e-4
PROMPT_TEXTS = [
    "A",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman",
    "def add(a, b):\n    return a + b",
]
LONG_TEXT = (
    "Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted. "
    "An inference engine schedules requests, batches them together, and keeps a cache of keys and values."
)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    # A budget of 8 tokens splits every longer prompt into chunks that run beside other sequences' decodes.
    return LLM(str(llama_dir), dtype="float32", max_num_batched_tokens=8)



def _prompts(llm: LLM, texts: list[str] = PROMPT_TEXTS) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    return [tokenizer.encode(text) for text in texts]


def _hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def _check_position(entry: dict[int, Logprob], logits: torch.Tensor, token: int, k: int, tokenizer) -> None:
    """One position's dict against transformers' logits there: the scored token is in it, the others are the
    top k, values are log_softmax, ranks by logit (a near-tie within TOL may order either way)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    assert token in entry
    assert len(entry) in (k, k + 1)
    kth_best = logprobs.topk(k).values[-1].item() if k else None
    for token_id, lp in entry.items():
        expected = logprobs[token_id].item()
        assert abs(lp.logprob - expected) < TOL, (token_id, lp.logprob, expected)
        assert int((logprobs > expected + TOL).sum()) + 1 <= lp.rank <= int((logprobs > expected - TOL).sum()) + 1
        assert lp.decoded_token == tokenizer.decode([token_id])
        if token_id != token:
            assert expected >= kth_best - TOL, "an entry that is not the scored token must be in the top k"


def _check_output(out: RequestOutput, prompt: list[int], params: SamplingParams, hf_llama, tokenizer) -> None:
    for completion in out.outputs:
        ids = prompt + completion.token_ids
        logits = _hf_logits(hf_llama, ids)
        if params.logprobs is None:
            assert completion.logprobs is None and completion.cumulative_logprob is None
        else:
            assert len(completion.logprobs) == len(completion.token_ids)
            for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
                _check_position(entry, logits[len(prompt) - 1 + i], token, params.logprobs, tokenizer)
            expected = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
            assert completion.cumulative_logprob == pytest.approx(expected, abs=1e-6)
    if params.prompt_logprobs is None:
        assert out.prompt_logprobs is None
        return
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    logits = _hf_logits(hf_llama, prompt)
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        _check_position(entry, logits[position - 1], prompt[position], params.prompt_logprobs, tokenizer)


def test_logprobs_and_prompt_logprobs_match_transformers(llm: LLM, hf_llama) -> None:
    prompts = _prompts(llm)
    prompts[0] = prompts[0][-1:]  # a one-token prompt
    asking = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=4, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    only_sampled = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    params = [asking, plain, asking, only_sampled, asking]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for out, prompt, p in zip(outputs, prompts, params):
        _check_output(out, prompt, p, hf_llama, tokenizer)
    # logprobs=0 gives exactly the drawn token; the one-token prompt gets [None].
    assert all(len(entry) == 1 for entry in outputs[3].outputs[0].logprobs)
    assert outputs[0].prompt_logprobs == [None]
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_logprobs_do_not_depend_on_the_batch(llm: LLM) -> None:
    prompts = _prompts(llm)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    others = SamplingParams(temperature=0.7, seed=3, max_tokens=9, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[3]}, params, use_tqdm=False)[0]
    mixed = llm.generate(
        [{"prompt_token_ids": p} for p in (prompts[2], prompts[3], prompts[4], prompts[1])],
        [others, params, others, others],
        use_tqdm=False,
    )[1]
    assert mixed.outputs[0].token_ids == alone.outputs[0].token_ids

    def same(a: dict[int, Logprob] | None, b: dict[int, Logprob] | None) -> None:
        if a is None:
            assert b is None
            return
        assert list(a) == list(b)
        for token_id in a:
            assert a[token_id].rank == b[token_id].rank
            assert a[token_id].logprob == pytest.approx(b[token_id].logprob, abs=1e-5)

    for a, b in zip(alone.outputs[0].logprobs, mixed.outputs[0].logprobs, strict=True):
        same(a, b)
    for a, b in zip(alone.prompt_logprobs, mixed.prompt_logprobs, strict=True):
        same(a, b)


def test_sampled_request_reports_raw_logprobs(llm: LLM, hf_llama) -> None:
    prompt = _prompts(llm)[3]
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
        logit_bias={100: 3.0}, seed=11, max_tokens=10, ignore_eos=True, logprobs=2,
    )
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    _check_output(out, prompt, params, hf_llama, llm.get_tokenizer())


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(llm: LLM, hf_llama) -> None:
    prompt = _prompts(llm)[2]
    forced = 100
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={forced: 100.0}, logprobs=1)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [forced] * 5
    _check_output(out, prompt, params, hf_llama, llm.get_tokenizer())
    assert all(entry[forced].rank > 1 for entry in out.outputs[0].logprobs)  # it only won through the bias
    # A strong negative bias bans the greedy choice.
    greedy = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    first = greedy[0].outputs[0].token_ids[0]
    banned = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100.0})
    assert llm.generate({"prompt_token_ids": prompt}, banned, use_tqdm=False)[0].outputs[0].token_ids[0] != first


def test_allowed_token_ids_restrict_greedy_output(llm: LLM, hf_llama) -> None:
    prompt = _prompts(llm)[4]
    allowed = [50, 60, 70, 80, 90]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, allowed_token_ids=allowed)
    tokens = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert set(tokens) <= set(allowed)
    logits = _hf_logits(hf_llama, prompt + tokens)
    for i, token in enumerate(tokens):  # each is the best allowed token under the model
        row = logits[len(prompt) - 1 + i]
        assert token == allowed[int(row[allowed].argmax())]


def test_streamed_deltas_carry_logprobs_once(llm: LLM, stream_deltas) -> None:
    engine = llm.engine
    prompt = _prompts(llm)[3]
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    engine.add_request("stream-logprobs", None, params, prompt_token_ids=prompt)
    deltas, final = stream_deltas(engine, params)
    tokens = [t for d in deltas for c in d.outputs for t in c.token_ids]
    logprobs = [lp for d in deltas for c in d.outputs for lp in c.logprobs]
    assert tokens == final.outputs[0].token_ids
    assert logprobs == final.outputs[0].logprobs
    with_prompt = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_prompt) == 1 and with_prompt[0] is deltas[0]
    assert with_prompt[0].prompt_logprobs == final.prompt_logprobs
    assert deltas[-1].outputs[0].cumulative_logprob == pytest.approx(final.outputs[0].cumulative_logprob)


def test_n_sequences_each_get_logprobs_and_prompt_logprobs_once(llm: LLM, hf_llama) -> None:
    prompt = _prompts(llm)[3]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    _check_output(out, prompt, params, hf_llama, llm.get_tokenizer())


def test_preemption_records_each_logprob_once(llama_dir: Path, hf_llama) -> None:
    from rayinfer.workers.kv_pool import bytes_per_block
    from rayinfer.workers.model_config import load_model_spec

    spec = load_model_spec(llama_dir)
    block_bytes = bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, torch.float32)
    # 5 blocks = 80 tokens: each request fits alone, not together, so prompts and decodes get preempted.
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory_bytes=5 * block_bytes, max_num_batched_tokens=16)
    prompts = _prompts(llm, [PROMPT_TEXTS[2], PROMPT_TEXTS[3], LONG_TEXT[60:160]])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    tokenizer = llm.get_tokenizer()
    for out, prompt in zip(outputs, prompts):
        _check_output(out, prompt, params, hf_llama, tokenizer)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(logprobs=21), r"logprobs: 21 requested, but this engine's max_logprobs is 20"),
        (dict(prompt_logprobs=25), r"prompt_logprobs: 25 requested, but this engine's max_logprobs is 20"),
        (dict(logit_bias={512: 1.0}), r"logit_bias: token ids must be in \[0, 512\)"),
        (dict(allowed_token_ids=[3, 600]), r"allowed_token_ids: token ids must be in \[0, 512\)"),
    ],
)
def test_out_of_range_requests_are_refused_at_add_time(llm: LLM, params: dict, match: str) -> None:
    assert llm.engine.model_spec.vocab_size == 512
    with pytest.raises(ValueError, match=match):
        llm.generate("Hello", SamplingParams(**params), use_tqdm=False)
    assert not llm.engine.requests and llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_max_logprobs_minus_one_lifts_the_cap(llm: LLM) -> None:
    capped = llm.engine.limits
    llm.engine.limits = dataclasses.replace(capped, max_logprobs=-1)
    try:
        out = llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=30), use_tqdm=False)[0]
    finally:
        llm.engine.limits = capped
    assert all(len(entry) in (30, 31) for entry in out.outputs[0].logprobs)
