"""The OpenAI-compatible Serve app end to end over HTTP on loopback, on the tiny model."""
from __future__ import annotations

import json

import pytest

from rayinfer.cluster import LLM, SamplingParams

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")


def _post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kwargs)


def test_health_and_models(server: str) -> None:
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 512


def test_completion_equals_offline_greedy(server: str, offline: LLM) -> None:
    expected = offline.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    reply = _post(f"{server}/v1/completions", body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected[0].outputs[0].text
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {
        "prompt_tokens": len(expected[0].prompt_token_ids),
        "completion_tokens": 12,
        "total_tokens": len(expected[0].prompt_token_ids) + 12,
    }


def test_streamed_completion_adds_up(server: str, offline: LLM) -> None:
    expected = offline.generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    body = {
        "model": "tiny", "prompt": "Hello world", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    with _post(f"{server}/v1/completions", body, stream=True) as reply:
        assert reply.status_code == 200
        events = [line[len("data: "):] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[0].outputs[0].text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_chat_completion(server: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5, "temperature": 0}
    data = _post(f"{server}/v1/chat/completions", body).json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] <= 5


def test_batch_of_prompts_and_n(server: str) -> None:
    body = {"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "seed": 1, "ignore_eos": True}
    data = _post(f"{server}/v1/completions", body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": [5] * 600}, 400, "prompt"),
    ],
    ids=["wrong-type", "out-of-range", "unknown-model", "too-long"],
)
def test_errors_are_openai_shaped(server: str, body: dict, status: int, param: str) -> None:
    reply = _post(f"{server}/v1/completions", body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if param == "prompt":
        assert "512" in error["message"] and "600" in error["message"]


def test_malformed_json_and_bad_chat_are_400_and_the_server_keeps_serving(server: str) -> None:
    broken = requests.post(f"{server}/v1/completions", data="{not json", timeout=30,
                           headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    too_long = _post(f"{server}/v1/chat/completions",
                     {"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages"
    missing = _post(f"{server}/v1/chat/completions", {"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    ok = _post(f"{server}/v1/completions", {"model": "tiny", "prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_metrics_parse_and_count_served_tokens(server: str, metrics) -> None:
    before = metrics.samples(server).get("rayinfer_generation_tokens_total", 0)
    _post(f"{server}/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 4, "ignore_eos": True})
    samples = metrics.wait_for(server, lambda s: s["rayinfer_generation_tokens_total"] >= before + 4)
    expected = {"rayinfer_num_requests_running", "rayinfer_num_requests_waiting", "rayinfer_kv_cache_usage_ratio",
                "rayinfer_num_preemptions_total", "rayinfer_prompt_tokens_total", "rayinfer_generation_tokens_total",
                "rayinfer_time_to_first_token_seconds_count", "rayinfer_inter_token_latency_seconds_count",
                "rayinfer_e2e_request_latency_seconds_count"}
    assert expected <= set(samples)
    assert samples["rayinfer_num_engine_replicas"] == 1
    assert samples["rayinfer_e2e_request_latency_seconds_count"] >= 1


def test_tokenize_round_trip(server: str) -> None:
    tokens = _post(f"{server}/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"])
    text = _post(f"{server}/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
