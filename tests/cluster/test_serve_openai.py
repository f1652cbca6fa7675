"""The server through the official `openai` client: what users of vLLM's server run against ours."""
from __future__ import annotations

import pytest

from rayinfer.cluster import LLM, SamplingParams

openai = pytest.importorskip("openai", reason="installed with the 'dev' extra")

PROMPTS = ["Once upon a time", "The capital of", "1, 2, 3,"]


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_completion_equals_transformers(client, offline: LLM, hf_greedy) -> None:
    tokenizer = offline.engine.tokenizer
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(offline.engine.config.model, prompt_ids, 16)
    reply = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    texts = [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [tokenizer.decode(ids) for ids in expected]
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in prompt_ids)
    assert reply.usage.completion_tokens == 16 * len(PROMPTS)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_completion_joins_to_the_plain_one(client) -> None:
    kwargs = {"model": "tiny", "prompt": "A long time ago", "max_tokens": 20, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len(chunks) > 3  # token by token, not one lump
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage == plain.usage


def test_chat_streamed_and_not(client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content


def test_n_two_gives_two_seeded_choices(client) -> None:
    kwargs = {"model": "tiny", "prompt": "Pick a word:", "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 7,
              "extra_body": {"ignore_eos": True}}
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert first.usage.completion_tokens == 16


def test_stop_string_ends_the_text_before_it(client, offline: LLM) -> None:
    free = offline.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    assert stop.strip(), "the reference text needs a stop string to cut at"
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].text == free[: free.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_errors_reach_the_client_as_api_errors(client) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, top_p=7)
    assert bad.value.body["param"] == "top_p"
    assert client.models.list().data[0].id == "tiny"  # and the server keeps serving
