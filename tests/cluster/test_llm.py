"""The offline API end to end on the tiny model: shapes, stopping, seeded sampling, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rayinfer.cluster import LLM, RequestOutput, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def greedy_run(llm: LLM) -> RequestOutput:
    return llm.generate("Once upon a time", SamplingParams(max_tokens=32, **GREEDY), use_tqdm=False)[0]


def _all_blocks_free(llm: LLM) -> bool:
    return llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_outputs_are_vllm_shaped_and_in_input_order(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    prompts = ["Hello world", {"prompt_token_ids": tokenizer.encode("A")}, "The quick brown fox jumps over the lazy dog"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outputs] == ["Hello world", None, "The quick brown fox jumps over the lazy dog"]
    assert outputs[1].prompt_token_ids == tokenizer.encode("A")
    for out in outputs:
        assert out.finished and out.error is None
        (completion,) = out.outputs
        assert completion.index == 0 and len(completion.token_ids) == 5 and completion.finish_reason == "length"
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert _all_blocks_free(llm)


def test_sampling_params_one_per_prompt(llm: LLM) -> None:
    outputs = llm.generate(
        ["a", "b"], [SamplingParams(max_tokens=2, **GREEDY), SamplingParams(max_tokens=4, **GREEDY)], use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2, 4]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)


def test_n_returns_n_completions(llm: LLM) -> None:
    (out,) = llm.generate("Hello", SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct random streams
    assert _all_blocks_free(llm)


def test_stop_token_ids(llm: LLM, greedy_run: RequestOutput) -> None:
    tokens = greedy_run.outputs[0].token_ids
    stop_id = tokens[6]
    first = tokens.index(stop_id)
    (out,) = llm.generate("Once upon a time", SamplingParams(max_tokens=32, stop_token_ids=[stop_id], **GREEDY), use_tqdm=False)
    completion = out.outputs[0]
    assert completion.token_ids == tokens[: first + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)


def test_stop_string_across_token_boundaries(llm: LLM, greedy_run: RequestOutput) -> None:
    tokenizer = llm.get_tokenizer()
    tokens = greedy_run.outputs[0].token_ids
    full_text = greedy_run.outputs[0].text
    # A stop string that starts inside token 8's text and ends inside token 11's text.
    start = len(tokenizer.decode(tokens[:8])) - 1
    end = len(tokenizer.decode(tokens[:11])) - 1
    stop = full_text[start:end]
    assert len(stop) >= 3
    cut = full_text.find(stop)
    params = SamplingParams(max_tokens=32, stop=[stop, "never-appears-xyz"], **GREEDY)
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert completion.text == full_text[:cut]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert len(completion.token_ids) < 32

    params = SamplingParams(max_tokens=32, stop=stop, include_stop_str_in_output=True, **GREEDY)
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert completion.text == full_text[: cut + len(stop)]


def test_min_tokens_holds_back_stop_tokens(llm: LLM, greedy_run: RequestOutput) -> None:
    tokens = greedy_run.outputs[0].token_ids
    stop_id = tokens[1]
    params = SamplingParams(max_tokens=32, min_tokens=6, stop_token_ids=[stop_id], **GREEDY)
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert stop_id not in completion.token_ids[:6]
    assert len(completion.token_ids) >= 6
    if completion.finish_reason == "stop":
        assert completion.token_ids[-1] == stop_id


def test_eos_from_generation_config_and_ignore_eos(llama_dir: Path, tmp_path: Path, greedy_run: RequestOutput) -> None:
    tokens = greedy_run.outputs[0].token_ids
    eos_id = tokens[4]
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], eos_id]
    generation_path.write_text(json.dumps(generation))
    llm = LLM(str(model_dir))
    completion = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == tokens[: tokens.index(eos_id) + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", None)
    completion = llm.generate("Once upon a time", SamplingParams(max_tokens=32, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == tokens and completion.finish_reason == "length"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"top_k": 20, "top_p": 0.9},
        {"min_p": 0.05, "repetition_penalty": 1.3},
        {"presence_penalty": 0.5, "frequency_penalty": 0.7, "temperature": 0.7},
    ],
)
def test_seeded_sampling_independent_of_batch(llm: LLM, llama_dir: Path, extra: dict) -> None:
    params = SamplingParams(seed=1234, max_tokens=20, ignore_eos=True, **extra)
    alone = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(seed=i, max_tokens=5 + i, ignore_eos=True) for i in range(5)]
    mixed = llm.generate(
        ["Hello", "The quick brown fox", "A much longer prompt that takes a few chunks to prefill, surely", "x", "y", "z"],
        [others[0], params, *others[1:]],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == alone
    # Another engine with a different step budget and block size schedules everything differently.
    other_engine = LLM(str(llama_dir), max_num_batched_tokens=5, block_size=4)
    assert other_engine.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0].token_ids == alone


def test_unseeded_sampling_follows_engine_seed(llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = LLM(str(llama_dir), seed=7).generate(["a", "b"], params, use_tqdm=False)
    second = LLM(str(llama_dir), seed=7).generate(["a", "b"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


def test_text_equals_decode_on_multibyte_output(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(n=4, seed=5, max_tokens=40, ignore_eos=True, temperature=1.5)
    for out in llm.generate(["日本語のテキスト", "café 🙂"], params, use_tqdm=False):
        for completion in out.outputs:
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_chat_applies_template(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == expected
    assert out.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    assert len(llm.chat([messages, messages[1:]], use_tqdm=False)) == 2


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "prompt: must not be empty"),
        ({"prompt_token_ids": []}, "prompt: must not be empty"),
        ({"prompt_token_ids": [10**6]}, "prompt_token_ids"),
        ({"prompt_token_ids": [5] * 600}, "600 tokens.*max_model_len is 512"),
        (42, "prompts"),
    ],
)
def test_bad_prompts_raise_and_leave_nothing_behind(llm: LLM, prompt, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", prompt], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert _all_blocks_free(llm)


def test_invalid_engine_args_name_the_field(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(llama_dir), block_size=24)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(llama_dir), max_model_len=100_000)
    with pytest.raises(ValueError, match="not_an_arg"):
        LLM(str(llama_dir), not_an_arg=1)


def test_unknown_architecture_lists_supported(llama_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        LLM(str(model_dir))


def test_failure_in_one_request_does_not_stop_the_others(llm: LLM, run_to_end) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=8, **GREEDY)
    for request_id in ("ok-1", "bad", "ok-2"):
        engine.add_request(request_id, "Hello there", params)

    def explode(token_id: int) -> str:
        raise RuntimeError("detokenizer blew up")

    engine.requests["bad"].seqs[0].detokenizer.append = explode
    finished = run_to_end(engine)
    assert "detokenizer blew up" in finished["bad"].error
    assert finished["bad"].outputs[0].finish_reason == "error"
    for request_id in ("ok-1", "ok-2"):
        assert finished[request_id].error is None
        assert len(finished[request_id].outputs[0].token_ids) == 8
    assert _all_blocks_free(llm)


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", "Hello there, a prompt of some length", SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert engine.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort_request("to-abort")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert _all_blocks_free(llm) and not engine.has_unfinished_requests()
