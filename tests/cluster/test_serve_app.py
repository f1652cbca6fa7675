"""The OpenAI-compatible Serve app end to end over HTTP on loopback, on the tiny model."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.configs import EngineConfig

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama_dir: Path, ray_session):
    from ray import serve

    from rayinfer.cluster.serve_app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(EngineConfig(model=str(llama_dir)), served_model_name="tiny"), name="rayinfer-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def offline(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir))


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


def test_tokenize_round_trip(server: str) -> None:
    tokens = _post(f"{server}/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"])
    text = _post(f"{server}/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
