"""`n`, `best_of` and `use_beam_search` through the server, each checked against the offline engine on the same
checkpoint: a best_of request returns the n sequences of highest cumulative logprob, best first, as the offline
engine does for the same seed; a beam search run from the ingress (one engine call per beam and step) returns
the beams `LLM.beam_search` returns, in the same order."""
from __future__ import annotations

import json
import time

import pytest

from rayinfer.cluster import LLM, BeamSearchParams, SamplingParams

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
MAX_TOKENS = 8


def _post(server: str, route: str, body: dict) -> requests.Response:
    return requests.post(f"{server}/v1/{route}", json={"model": "tiny", **body}, timeout=120,
                         stream=bool(body.get("stream")))


def _ok(server: str, route: str, body: dict) -> dict:
    reply = _post(server, route, body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _events(reply: requests.Response) -> list[dict]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _error(server: str, route: str, body: dict) -> dict:
    reply = _post(server, route, body)
    assert reply.status_code == 400, reply.text
    return reply.json()["error"]


def _chat_prompt_ids(offline: LLM) -> list[int]:
    """The chat prompt as the server builds it: the template's text, its special tokens not added twice."""
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------- n and best_of


def _best_of_params(**extra) -> SamplingParams:
    return SamplingParams(n=2, best_of=4, temperature=1.0, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True, **extra)


BEST_OF_BODY = {"n": 2, "best_of": 4, "temperature": 1.0, "seed": 11, "max_tokens": MAX_TOKENS, "ignore_eos": True}


def test_best_of_completion_equals_the_offline_engine(server: str, offline: LLM) -> None:
    expected = offline.generate(PROMPT, _best_of_params(logprobs=0), use_tqdm=False)[0].outputs
    # the 2 of highest cumulative logprob of the 4 drawn, best first
    assert expected[0].cumulative_logprob >= expected[1].cumulative_logprob
    reply = _ok(server, "completions", {"prompt": PROMPT, **BEST_OF_BODY})
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert [c["text"] for c in reply["choices"]] == [out.text for out in expected]
    assert [c["finish_reason"] for c in reply["choices"]] == ["length", "length"]
    assert reply["usage"]["completion_tokens"] == 2 * MAX_TOKENS  # the returned sequences only

    events = _events(_post(server, "completions", {"prompt": PROMPT, **BEST_OF_BODY, "stream": True,
                                                   "stream_options": {"include_usage": True}}))
    chunks = [choice for event in events for choice in event["choices"]]
    # only the final output is streamed: each choice once, with its full text
    assert sorted(c["index"] for c in chunks) == [0, 1]
    assert [c["text"] for c in sorted(chunks, key=lambda c: c["index"])] == [out.text for out in expected]
    assert all(c["finish_reason"] == "length" for c in chunks)
    assert events[-1]["usage"] == reply["usage"]


def test_chat_n_and_best_of_equal_the_offline_engine(server: str, offline: LLM) -> None:
    for params, body in (
        (SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True),
         {"n": 2, "temperature": 1.0, "seed": 5, "max_tokens": MAX_TOKENS, "ignore_eos": True}),
        (_best_of_params(), BEST_OF_BODY),
    ):
        expected = [out.text for out in offline.chat(MESSAGES, params, use_tqdm=False)[0].outputs]
        reply = _ok(server, "chat/completions", {"messages": MESSAGES, **body})
        assert [c["message"]["content"] for c in reply["choices"]] == expected
        assert [c["index"] for c in reply["choices"]] == [0, 1]
        assert reply["usage"]["completion_tokens"] == 2 * MAX_TOKENS
        events = _events(_post(server, "chat/completions", {"messages": MESSAGES, **body, "stream": True}))
        texts = {0: "", 1: ""}
        for event in events:
            for choice in event["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
        assert [texts[0], texts[1]] == expected


# ------------------------------------------------------------------------------------------- beam search


def _offline_beams(offline: LLM, prompt, width: int, **params) -> list:
    if isinstance(prompt, list):
        prompt = {"prompt_token_ids": prompt}
    (out,) = offline.beam_search(prompt, BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, **params))
    return out.outputs


@pytest.mark.parametrize(("width", "extra"), [(2, {}), (3, {"length_penalty": 0.5, "ignore_eos": True})])
def test_beam_search_equals_the_offline_search(server: str, offline: LLM, width: int, extra: dict) -> None:
    expected = _offline_beams(offline, PROMPT, width, **extra)
    reply = _ok(server, "completions", {"prompt": PROMPT, "use_beam_search": True, "n": width,
                                        "max_tokens": MAX_TOKENS, "temperature": 0, **extra})
    assert [c["index"] for c in reply["choices"]] == list(range(width))
    assert [c["text"] for c in reply["choices"]] == [out.text for out in expected]
    assert len({c["text"] for c in reply["choices"]}) == width  # distinct beams
    assert [c["finish_reason"] for c in reply["choices"]] == [out.finish_reason for out in expected]
    prompt_len = len(offline.get_tokenizer().encode(PROMPT))
    assert reply["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": width * MAX_TOKENS,
                              "total_tokens": prompt_len + width * MAX_TOKENS}


def test_beam_search_returns_the_n_best_of_best_of_beams(server: str, offline: LLM) -> None:
    expected = _offline_beams(offline, PROMPT, 4)
    reply = _ok(server, "completions", {"prompt": PROMPT, "use_beam_search": True, "n": 2, "best_of": 4,
                                        "max_tokens": MAX_TOKENS})
    assert [c["text"] for c in reply["choices"]] == [out.text for out in expected[:2]]
    assert reply["usage"]["completion_tokens"] == 2 * MAX_TOKENS


def test_beam_search_over_a_prompt_batch_and_chat(server: str, offline: LLM) -> None:
    prompts = [PROMPT, "1, 2, 3,"]
    reply = _ok(server, "completions", {"prompt": prompts, "use_beam_search": True, "n": 2, "max_tokens": 4})
    expected = []
    for prompt in prompts:
        (out,) = offline.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=4))
        expected += [o.text for o in out.outputs]
    assert [(c["index"], c["text"]) for c in reply["choices"]] == list(enumerate(expected))

    expected = _offline_beams(offline, _chat_prompt_ids(offline), 3)
    reply = _ok(server, "chat/completions", {"messages": MESSAGES, "use_beam_search": True, "n": 2, "best_of": 3,
                                             "max_completion_tokens": MAX_TOKENS})
    assert [c["message"]["content"] for c in reply["choices"]] == [out.text for out in expected[:2]]
    assert [c["message"]["role"] for c in reply["choices"]] == ["assistant", "assistant"]


def test_streamed_beam_search_sends_the_result_as_one_chunk(server: str) -> None:
    body = {"prompt": PROMPT, "use_beam_search": True, "n": 2, "max_tokens": MAX_TOKENS}
    plain = _ok(server, "completions", body)
    events = _events(_post(server, "completions", {**body, "stream": True,
                                                   "stream_options": {"include_usage": True}}))
    assert len(events) == 2 and events[0]["object"] == "text_completion"
    texts = [(c["index"], c["text"], c["finish_reason"]) for c in plain["choices"]]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in events[0]["choices"]] == texts
    assert events[1]["choices"] == [] and events[1]["usage"] == plain["usage"]

    chat = {"messages": MESSAGES, "use_beam_search": True, "n": 2, "max_tokens": 4}
    plain = _ok(server, "chat/completions", chat)
    (event,) = _events(_post(server, "chat/completions", {**chat, "stream": True}))
    assert event["object"] == "chat.completion.chunk"
    assert [c["delta"] for c in event["choices"]] == [
        {"role": "assistant", "content": c["message"]["content"]} for c in plain["choices"]]
    assert [c["finish_reason"] for c in event["choices"]] == ["length", "length"]


@pytest.mark.parametrize(("route", "body", "param"), [
    ("completions", {"temperature": 0.7}, "temperature"),
    ("completions", {"top_p": 0.5}, "top_p"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"stop": ["x"]}, "stop"),
    ("completions", {"n": 3, "best_of": 2}, "best_of"),
    ("completions", {"n": 11}, "n"),  # 22 candidates per beam > the engine's max_logprobs (20)
    ("completions", {"n": 1, "best_of": 11}, "best_of"),
    ("completions", {"length_penalty": "long"}, "length_penalty"),
    ("completions", {"max_tokens": 100_000}, "max_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("chat/completions", {"temperature": 1.0}, "temperature"),
    ("chat/completions", {"n": 2, "best_of": 11}, "best_of"),
])
def test_beam_search_refusals_name_the_field(server: str, route: str, body: dict, param: str) -> None:
    prompt = {"prompt": PROMPT} if route == "completions" else {"messages": MESSAGES}
    error = _error(server, route, {**prompt, "use_beam_search": True, "max_tokens": 2, **body})
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_a_client_that_leaves_stops_its_beam_search(server: str, metrics) -> None:
    """Every step is an engine request of its own (finishing at its one token, "length"): once the client has
    gone, no new steps start and none is left running."""
    steps = "rayinfer_request_success_total:length"
    max_model_len = requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    body = {"model": "tiny", "prompt": PROMPT, "use_beam_search": True, "n": 4, "ignore_eos": True,
            "max_tokens": min(400, max_model_len - 16)}
    before = metrics.samples(server).get(steps, 0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server}/v1/completions", json=body, timeout=(10, 0.5))
    # The whole search is 400 steps of 4 beams. The replica runs a step in a few ms on the tiny model, so how far it
    # got before the client left says little; that it never finished, and stands still now, says it was stopped.
    deadline, done = time.monotonic() + 15, None
    while True:
        time.sleep(1.0)
        now = metrics.samples(server)
        if now.get(steps, 0) == done and now["rayinfer_num_requests_running"] == 0:
            break
        done = now.get(steps, 0)
        assert time.monotonic() < deadline, "the beam search kept running after its client left"
    assert now["rayinfer_num_requests_waiting"] == 0 and now["rayinfer_kv_cache_usage_ratio"] == 0
    assert 0 < done - before < 4 * body["max_tokens"]
