"""`LLM.beam_search` against transformers' `generate(num_beams=k)` on the tiny model in float32: the same beams,
token for token, in the same order, with the same scores (with and without EOS, for several length penalties);
the beams share KV blocks through the prefix cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, BeamSearchParams

MAX_NEW = 8
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village",
]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", block_size=4)



def _hf_beams(model, prompt: list[int], k: int, eos: int | None, **kwargs) -> tuple[list[list[int]], list[float]]:
    """transformers' k beams (generated tokens, cut after an EOS; it pads finished ones) and their scores."""
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=k, num_return_sequences=k,
            max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0, output_scores=True,
            return_dict_in_generate=True, **kwargs,
        )
    beams = []
    for row in out.sequences:
        generated = row[len(prompt):].tolist()
        if eos is not None and eos in generated:
            generated = generated[: generated.index(eos) + 1]
        beams.append(generated)
    return beams, out.sequences_scores.tolist()


def _check_against_hf(llm: LLM, hf_llama, prompt: list[int], k: int, eos: int | None, length_penalty: float,
                      early_stopping: bool | str) -> list[str]:
    params = BeamSearchParams(beam_width=k, max_tokens=MAX_NEW, ignore_eos=eos is None, length_penalty=length_penalty)
    (out,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    beams, scores = _hf_beams(hf_llama, prompt, k, eos, length_penalty=length_penalty, early_stopping=early_stopping)
    assert [c.token_ids for c in out.outputs] == beams
    ours = [c.cumulative_logprob / len(c.token_ids) ** length_penalty for c in out.outputs]
    assert ours == pytest.approx(scores, abs=1e-4)
    assert [c.index for c in out.outputs] == list(range(k))
    return [c.finish_reason for c in out.outputs]


@pytest.mark.parametrize("k", [2, 4])
def test_beams_equal_transformers_without_eos(llm: LLM, hf_llama, k: int) -> None:
    tokenizer = llm.get_tokenizer()
    for text in TEXTS:
        reasons = _check_against_hf(llm, hf_llama, tokenizer.encode(text), k, None, 1.0, False)
        assert reasons == ["length"] * k


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beams_equal_transformers_with_eos(llm: LLM, hf_llama, monkeypatch, length_penalty: float) -> None:
    """The random tiny model never picks its own EOS, so a token its beams like stands in for it: beams that end
    there finish, ranked by transformers' score (the EOS counts in the length), with early_stopping="never" (the
    exact stopping rule, which this search uses)."""
    tokenizer = llm.get_tokenizer()
    reasons = []
    for text in TEXTS[1:]:
        prompt = tokenizer.encode(text)
        (free,) = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(4, MAX_NEW, ignore_eos=True))
        eos = free.outputs[1].token_ids[2]
        monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({eos}))
        for k in (2, 4):
            reasons += _check_against_hf(llm, hf_llama, prompt, k, eos, length_penalty, "never")
        monkeypatch.undo()
    assert "length" in reasons
    if length_penalty <= 1.0:  # (a large penalty favours the long beams that never met the EOS)
        assert "stop" in reasons  # some of the best beams did end at the EOS


def test_beams_share_kv_blocks_through_the_prefix_cache(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", block_size=4)  # made without enable_prefix_caching
    engine, manager = llm.engine, llm.engine.block_manager
    worker = engine.executor.worker
    run = worker.execute
    tokens_run = []

    def counting(plan):
        tokens_run.append(plan.num_tokens)
        return run(plan)

    worker.execute = counting
    prompt = llm.get_tokenizer().encode(TEXTS[1])
    assert len(prompt) >= 12
    llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=1))
    assert manager.num_prefix_hits == 0  # the first step has one beam: nothing to share yet
    k, steps = 4, 6
    tokens_run.clear()
    (out,) = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=k, max_tokens=steps))
    # From the second step on, each beam finds at least the prompt's full blocks in the cache.
    full_prompt_blocks = len(prompt) // 4 * 4
    assert manager.num_prefix_hits >= (steps - 1) * k * full_prompt_blocks
    # Without sharing every step would run each beam's whole text; with it, a beam's last partial block at most.
    unshared = len(prompt) + sum(k * (len(prompt) + t) for t in range(1, steps))
    assert sum(tokens_run) <= len(prompt) + (steps - 1) * k * 4 < unshared
    assert [len(c.token_ids) for c in out.outputs] == [steps] * k
    # Prefix caching was on for the search only; every block is free again.
    assert manager.enable_prefix_caching is False and not engine.config.enable_prefix_caching
    assert engine.num_free_blocks == manager.num_blocks


def test_outputs_are_shaped_like_generate(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    prompts = [TEXTS[0], {"prompt_token_ids": tokenizer.encode(TEXTS[2])}]
    outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))
    assert [o.prompt for o in outputs] == [TEXTS[0], None]
    assert outputs[1].prompt_token_ids == tokenizer.encode(TEXTS[2])
    for out in outputs:
        assert out.finished and out.error is None and len(out.outputs) == 3
        assert len({tuple(c.token_ids) for c in out.outputs}) == 3
        scores = [c.cumulative_logprob / len(c.token_ids) for c in out.outputs]
        assert scores == sorted(scores, reverse=True)
        for c in out.outputs:
            assert c.finish_reason == "length" and len(c.token_ids) == 5
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert len(c.logprobs) == 5 and all(t in entry for t, entry in zip(c.token_ids, c.logprobs))
            assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_beams_stop_at_max_model_len(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", block_size=4, max_model_len=20)
    prompt = list(range(100, 117))  # 17 tokens: room for 3 more
    params = BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True)
    (out,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    assert [(len(c.token_ids), c.finish_reason) for c in out.outputs] == [(3, "length")] * 2


def test_bad_beam_search_requests_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"beam_width: 11 needs 22 candidate logprobs .* max_logprobs is 20"):
        llm.beam_search("Hello", BeamSearchParams(beam_width=11, max_tokens=2, ignore_eos=True))
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=2)
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        llm.beam_search("", BeamSearchParams(beam_width=2, max_tokens=2))
    assert not llm.engine.requests and llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_the_search_stops_once_no_live_beam_can_win() -> None:
    """A toy model whose every position prefers the EOS (token 0): with no length penalty, once beam_width beams
    have ended no live beam can beat them (a sum of logprobs only falls), so the engine is not stepped again."""
    import math

    from rayinfer.cluster.beam_search import beam_search
    from rayinfer.scheduler.outputs import Logprob

    probs = {0: 0.6, 1: 0.3, 2: 0.1}
    calls = []

    def step(inputs: list[list[int]]) -> list[dict[int, Logprob]]:
        calls.append(len(inputs))
        return [{t: Logprob(math.log(p), rank) for rank, (t, p) in enumerate(probs.items(), 1)} for _ in inputs]

    params = BeamSearchParams(beam_width=2, max_tokens=10, length_penalty=0.0)
    (beams,) = beam_search(step, [[7, 8]], params, eos_token_ids={0}, max_model_len=100)
    assert [(b.token_ids, b.finish_reason) for b in beams] == [([0], "stop"), ([1, 0], "stop")]
    assert beams[1].cumulative_logprob == pytest.approx(math.log(0.3) + math.log(0.6))
    assert calls == [1, 2]  # two steps, not ten
    # A length penalty of 1 lets longer beams win (their mean logprob can still rise), so the search goes on.
    calls.clear()
    (beams,) = beam_search(step, [[7, 8]], BeamSearchParams(2, 10, length_penalty=1.0), {0}, 100)
    assert len(calls) > 2
    assert [b.token_ids for b in beams] == [[0], [1, 0]]
