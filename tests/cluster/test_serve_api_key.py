"""`api_key`: the OpenAI routes, /tokenize and /detokenize need `Authorization: Bearer <key>` (else 401, OpenAI-shaped,
before the body is read); /health, /metrics and the schema stay open. Over HTTP, on an `LLMServer` whose engine
is a stand-in, served under a route prefix."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")
serve = pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = "sk-test-0123456789"


class EchoEngine:
    """Stands in for `EngineReplica`: every request completes with "ok"."""

    def __init__(self, config) -> None:
        pass

    def info(self) -> dict:
        return {"max_model_len": 512, "model": "keyed"}

    def check_health(self) -> None:
        pass

    def health_problem(self) -> None:
        return None

    def shutdown(self) -> None:
        pass

    def stream(self, request_id, prompt, params, prompt_token_ids):
        return OneDelta(RequestOutput(request_id, None, [1, 2], finished=True, outputs=[
            CompletionOutput(index=0, text="ok", token_ids=[7], finish_reason="length")]))


class OneDelta:
    """What `EngineReplica.stream` returns: here one finished delta, and `cancel()`."""

    def __init__(self, delta: RequestOutput) -> None:
        self._delta = delta

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._delta is None:
            raise StopAsyncIteration
        delta, self._delta = self._delta, None
        return delta

    def cancel(self) -> None:
        pass


@pytest.fixture(scope="module")
def keyed(serve_instance: str, llama_dir: Path) -> str:
    from rayinfer.cluster.openai.routes import LLMServer
    from rayinfer.configs import EngineConfig

    config = EngineConfig(model=str(llama_dir), api_key=KEY)
    assert KEY not in repr(config) and KEY not in str(config.model_dump())  # printing a config hides it
    serve.run(LLMServer.bind(config, "keyed", EchoEngine), name="keyed", route_prefix="/keyed")
    yield f"{serve_instance}/keyed"
    serve.delete("keyed")


ROUTES = [
    ("post", "/v1/completions", {"model": "keyed", "prompt": "hi", "max_tokens": 2}),
    ("post", "/v1/chat/completions", {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}),
    ("get", "/v1/models", None),
    ("post", "/tokenize", {"prompt": "hi"}),
    ("post", "/detokenize", {"tokens": [5]}),
]


@pytest.mark.parametrize("method,route,body", ROUTES, ids=[r for _, r, _ in ROUTES])
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {KEY}x", KEY, f"Basic {KEY}"],
                         ids=["none", "wrong", "longer", "no-scheme", "other-scheme"])
def test_protected_routes_refuse_a_missing_or_wrong_key(keyed: str, method, route, body, header) -> None:
    headers = {"Authorization": header} if header else {}
    reply = requests.request(method, f"{keyed}{route}", json=body, headers=headers, timeout=30)
    assert reply.status_code == 401, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert error["param"] == "Authorization" and reply.headers["WWW-Authenticate"] == "Bearer"
    assert KEY not in reply.text


@pytest.mark.parametrize("method,route,body", ROUTES, ids=[r for _, r, _ in ROUTES])
def test_protected_routes_serve_the_right_key(keyed: str, method, route, body) -> None:
    for header in (f"Bearer {KEY}", f"bearer {KEY}"):  # an auth scheme's name ignores case (RFC 9110)
        reply = requests.request(method, f"{keyed}{route}", json=body, headers={"Authorization": header}, timeout=30)
        assert reply.status_code == 200, reply.text


def test_health_metrics_and_schema_stay_open(keyed: str) -> None:
    for route in ("/health", "/metrics", "/openapi.json"):
        assert requests.get(f"{keyed}{route}", timeout=30).status_code == 200, route


def test_the_openai_client_passes_its_key(keyed: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="keyed", prompt="hi", max_tokens=2).choices[0].text == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).models.list()


def test_the_key_may_come_from_the_environment(monkeypatch) -> None:
    from rayinfer.cluster.openai import api_key

    monkeypatch.setenv(api_key.ENV_VAR, "from-env")
    api_key.configure(None)
    assert api_key.KEY.expected == b"from-env"
    api_key.configure("given")  # a key given as an argument wins
    assert api_key.KEY.expected == b"given"
    monkeypatch.delenv(api_key.ENV_VAR)
    api_key.configure(None)
    assert api_key.KEY.expected is None
