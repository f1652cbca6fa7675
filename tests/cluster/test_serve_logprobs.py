"""`logprobs`, `top_logprobs`, `echo` and `logit_bias` through the server, shaped as OpenAI's and vLLM's servers shape
them, checked against the offline engine on the same checkpoint."""
from __future__ import annotations

import json

import pytest

from rayinfer.cluster import LLM, SamplingParams

openai = pytest.importorskip("openai", reason="installed with the 'dev' extra")
requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")

PROMPT = "Once upon a time"
TOL = 1e-5


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _greedy(offline: LLM, prompt, max_tokens: int, **params):
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params),
                            use_tqdm=False)[0]


def _post(server: str, route: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{server}/v1/{route}", json={"model": "tiny", **body}, timeout=120, **kwargs)


def _events(reply: requests.Response) -> list[dict]:
    events = [line[len("data: "):] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _expected_legacy(token_ids: list[int], positions: list, num_top: int, offset: int = 0) -> dict:
    """The legacy completions logprobs for the offline engine's tokens, built by hand."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, position in zip(token_ids, positions):
        token = position[token_id].decoded_token
        out["tokens"].append(token)
        out["token_logprobs"].append(position[token_id].logprob)
        top: dict[str, float] = {}
        for tid, lp in position.items():  # the drawn token first; of ids with the same text the first one counts
            if tid == token_id or lp.rank <= num_top:
                top.setdefault(lp.decoded_token, lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def _assert_legacy_close(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"]
    assert got["text_offset"] == expected["text_offset"]
    for a, b in zip(got["token_logprobs"], expected["token_logprobs"], strict=True):
        assert (a is None and b is None) or a == pytest.approx(b, abs=TOL)
    for a, b in zip(got["top_logprobs"], expected["top_logprobs"], strict=True):
        if b is None:
            assert a is None
        else:
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=TOL) for k in b)


def _join_legacy(parts: list[dict]) -> dict:
    return {key: [v for part in parts for v in part[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                       "text_offset")}


# ------------------------------------------------------------------------------------------ completions


def test_completion_logprobs_equal_the_offline_engine(client, offline: LLM) -> None:
    expected = _greedy(offline, PROMPT, 6, logprobs=3)
    out = expected.outputs[0]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text == out.text
    got = choice.logprobs.model_dump()
    _assert_legacy_close(got, _expected_legacy(out.token_ids, out.logprobs, 3))
    assert len(got["tokens"]) == 6
    # the drawn token and the top 3 (fewer where ids share a text, as partial UTF-8 bytes all read "\ufffd")
    assert all(token in top and len(top) <= 4 for token, top in zip(got["tokens"], got["top_logprobs"]))
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(6)]
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids) and reply.usage.completion_tokens == 6


def test_logprobs_zero_gives_the_drawn_token_only(client, offline: LLM) -> None:
    out = _greedy(offline, PROMPT, 3, logprobs=0).outputs[0]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    got = reply.choices[0].logprobs
    assert [list(top) for top in got.top_logprobs] == [[t] for t in got.tokens]
    assert got.token_logprobs == pytest.approx([out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)],
                                               abs=TOL)


def test_streamed_completion_logprobs_join_to_the_plain_ones(client) -> None:
    kwargs = {"model": "tiny", "prompt": ["A long time ago", "1, 2, 3,"], "max_tokens": 8, "temperature": 0,
              "logprobs": 2, "extra_body": {"ignore_eos": True}}
    plain = {c.index: c for c in client.completions.create(**kwargs).choices}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert len(mine) > 2  # token by token
        assert "".join(c.text for c in mine) == plain[index].text
        joined = _join_legacy([c.logprobs.model_dump() for c in mine])
        _assert_legacy_close(joined, plain[index].logprobs.model_dump())  # another batch: equal up to float noise
    assert chunks[-1].usage.completion_tokens == 16


def test_echo_prepends_the_prompt_and_its_logprobs(client, offline: LLM) -> None:
    expected = _greedy(offline, PROMPT, 4, logprobs=2, prompt_logprobs=2)
    out, prompt_ids = expected.outputs[0], expected.prompt_token_ids
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                      echo=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text == PROMPT + out.text
    got = choice.logprobs.model_dump()
    assert len(got["tokens"]) == len(prompt_ids) + 4
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None  # nothing predicts the first token
    first = offline.engine.tokenizer.decode([prompt_ids[0]])
    prompt_part = _expected_legacy(prompt_ids[1:], expected.prompt_logprobs[1:], 2, offset=len(first))
    completion_part = _expected_legacy(out.token_ids, out.logprobs, 2,
                                       offset=len(first) + sum(len(t) for t in prompt_part["tokens"]))
    head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    _assert_legacy_close(got, _join_legacy([head, prompt_part, completion_part]))
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 4  # usage unchanged

    streamed = [c.choices[0] for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True, stream=True,
        extra_body={"ignore_eos": True}) if c.choices]
    assert streamed[0].text.startswith(PROMPT)
    assert "".join(c.text for c in streamed) == choice.text
    _assert_legacy_close(_join_legacy([c.logprobs.model_dump() for c in streamed]), got)


def test_echo_without_logprobs_and_of_token_ids(client, offline: LLM) -> None:
    ids = offline.engine.tokenizer.encode("The capital of")
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == offline.engine.tokenizer.decode(ids) + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


# ------------------------------------------------------------------------------------------------- chat

MESSAGES = [{"role": "user", "content": "Hello there"}]


def test_chat_logprobs_format_and_values(client, server: str) -> None:
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        for top in entry.top_logprobs:
            assert top.bytes == list(top.token.encode("utf-8", errors="replace"))

    raw = _post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0,
                                             "logprobs": True})
    entries = raw.json()["choices"][0]["logprobs"]["content"]
    assert set(entries[0]) == {"token", "logprob", "bytes", "top_logprobs"} and entries[0]["top_logprobs"] == []
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs_join_to_the_plain_ones(client) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
              "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    joined = [entry for c in chunks for entry in (c.choices[0].logprobs.content or [])]
    assert len(joined) == len(plain) == 6
    for got, want in zip(joined, plain):
        assert (got.token, got.bytes) == (want.token, want.bytes)
        assert got.logprob == pytest.approx(want.logprob, abs=TOL)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([t.logprob for t in want.top_logprobs], abs=TOL)
    assert sum(1 for c in chunks if c.choices[0].logprobs.content) > 2  # each chunk carries its own tokens


# ------------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_forces_a_token(client, offline: LLM) -> None:
    tokenizer = offline.engine.tokenizer
    free = _greedy(offline, PROMPT, 4).outputs[0].token_ids
    forced = next(t for t in range(300, 512) if t not in free and tokenizer.decode([t]).strip())
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                      logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 4
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, logit_bias={str(forced): 100},
                                          extra_body={"ignore_eos": True})
    assert [e.token for e in chat.choices[0].logprobs.content] == [tokenizer.decode([forced])] * 3
    # a ban moves greedy off its first choice
    banned = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(free[0]): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.tokens != [tokenizer.decode([free[0]])]


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs", ["21", "20"]),
        ("completions", {"prompt": "x", "logprobs": 21, "echo": True}, "logprobs", ["21", "20"]),
        ("completions", {"prompt": "x", "logprobs": -1}, "logprobs", []),
        ("completions", {"prompt": "x", "echo": True, "max_tokens": 0}, "max_tokens", ["echo"]),
        ("completions", {"prompt": "x", "logit_bias": {"100000": 5}}, "logit_bias", ["100000"]),
        ("completions", {"prompt": "x", "logit_bias": {"abc": 5}}, "logit_bias", ["abc"]),
        ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
         ["21", "20"]),
        ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
        ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "top_logprobs", []),
    ],
    ids=["over-max", "over-max-echo", "negative", "echo-zero-tokens", "bias-out-of-vocab", "bias-bad-key",
         "chat-over-max", "chat-top-without-logprobs", "chat-negative"],
)
def test_bad_logprob_fields_are_400_naming_the_field(server: str, route, body, param, words) -> None:
    reply = _post(server, route, {"max_tokens": 2, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    for word in [param, *words]:
        assert word in error["message"], error
    assert _post(server, "completions", {"prompt": "still here", "max_tokens": 1}).status_code == 200
