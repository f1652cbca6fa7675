"""Engine-side failures as the HTTP client sees them, from an `LLMServer` whose engine is a stand-in that fails on
cue.

A refusal answers 400 naming the client's field (carried as data, never parsed from the message), a full queue
answers 503 with Retry-After (Serve's proxy, before the replica), an engine that raises or ends a request with an error answers 500 (an error event
once a stream has started), and none of it stops the server from serving the next request.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest

from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput
from rayinfer.scheduler.request_errors import InvalidRequestError

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")
serve = pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")

# Serve replicas cannot import this test module: its deployment travels by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _output(text: str, finished: bool, error: str | None = None) -> RequestOutput:
    reason = "error" if error else ("length" if finished else None)
    completion = CompletionOutput(index=0, text=text, token_ids=[7] * len(text), finish_reason=reason)
    return RequestOutput("r", None, [1, 2], outputs=[completion], finished=finished, error=error)


class CuedStream:
    """What `EngineReplica.stream` returns: the request's deltas, and `cancel()`."""

    def __init__(self, deltas) -> None:
        self._deltas = deltas

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._deltas.__anext__()

    def cancel(self) -> None:
        pass


class CuedEngine:
    """Stands in for `EngineReplica`: the prompt says what to do."""

    def __init__(self, config) -> None:
        pass

    def info(self) -> dict:
        return {"max_model_len": 512, "model": "cued"}

    def check_health(self) -> None:
        pass

    problem: str | None = None  # what /health reports; set by the "sicken" and "heal" prompts

    def health_problem(self) -> str | None:
        return CuedEngine.problem

    def shutdown(self) -> None:
        pass

    def stream(self, request_id, prompt, params, prompt_token_ids) -> CuedStream:
        return CuedStream(self._generate(prompt))

    async def _generate(self, prompt):
        if prompt == "refuse":  # as the engine refuses an echo request's prompt logprobs over its cap
            raise InvalidRequestError.about("prompt_logprobs", "5 requested, but this engine's max_logprobs is 2")
        if prompt in ("sicken", "heal"):
            CuedEngine.problem = "the engine is replacing its worker group" if prompt == "sicken" else None
        if prompt == "crash":
            raise RuntimeError("the engine replica broke")
        if prompt == "fail":
            yield _output("", finished=True, error="the worker group died")
            return
        if prompt == "fail midway":
            yield _output("ab", finished=False)
            raise RuntimeError("lost the engine mid-stream")
        if prompt == "slow":
            await asyncio.sleep(2.0)
        yield _output("ok", finished=True)


@pytest.fixture(scope="module")
def cued(serve_instance: str, llama_dir: Path) -> str:
    from rayinfer.cluster.openai.routes import LLMServer
    from rayinfer.configs import EngineConfig

    # One request at a time and one waiting: a third concurrent request finds the queue full.
    server = LLMServer.options(max_ongoing_requests=1, max_queued_requests=1)
    app = server.bind(EngineConfig(model=str(llama_dir)), "cued", CuedEngine)
    serve.run(app, name="cued", route_prefix="/cued")
    yield f"{serve_instance}/cued"
    serve.delete("cued")


def _complete(url: str, prompt: str, **extra) -> requests.Response:
    body = {"model": "cued", "prompt": prompt, "max_tokens": 4, **extra}
    return requests.post(f"{url}/v1/completions", json=body, timeout=60, stream=extra.get("stream", False))


def _assert_error(reply: requests.Response, status: int, type_: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == type_ and error["code"] == status


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusal_is_400_naming_the_client_field(cued: str, stream: bool) -> None:
    reply = _complete(cued, "refuse", logprobs=5, echo=True, stream=stream)
    _assert_error(reply, 400, "invalid_request_error")
    error = reply.json()["error"]
    assert error["param"] == "logprobs"  # the engine's prompt_logprobs is this request's logprobs
    assert error["message"] == "logprobs: 5 requested, but this engine's max_logprobs is 2"


def test_engine_exception_is_500_and_the_next_request_is_served(cued: str) -> None:
    _assert_error(_complete(cued, "crash"), 500, "internal_error")
    assert _complete(cued, "hello").json()["choices"][0]["text"] == "ok"


def test_request_ended_by_an_engine_failure_is_500(cued: str) -> None:
    reply = _complete(cued, "fail")
    _assert_error(reply, 500, "internal_error")
    assert "worker group died" in reply.json()["error"]["message"]


def test_failure_after_the_stream_started_is_an_error_event(cued: str) -> None:
    with _complete(cued, "fail midway", stream=True) as reply:
        assert reply.status_code == 200
        events = [line[6:] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "ab"
    error = json.loads(events[1])["error"]
    assert error["code"] == 500 and error["type"] == "internal_error"
    assert events[-1] == "[DONE]"


def test_full_queue_is_503_with_retry_after(cued: str) -> None:
    replies: list[requests.Response] = []
    lock = threading.Lock()

    def send() -> None:
        reply = _complete(cued, "slow")
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=send) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    for reply in replies:  # Serve's proxy refuses them, in front of the replica
        if reply.status_code == 503:
            assert "backpressure" in reply.text and "max_queued_requests=1" in reply.text, reply.text
            assert int(reply.headers["Retry-After"]) >= 1
    assert _complete(cued, "hello").status_code == 200  # capacity came back


def test_health_is_503_with_the_reason_while_the_engine_cannot_serve(cued: str) -> None:
    assert requests.get(f"{cued}/health", timeout=30).json() == {"status": "ok"}
    assert _complete(cued, "sicken").status_code == 200
    reply = requests.get(f"{cued}/health", timeout=30)
    assert reply.status_code == 503
    assert reply.json() == {"status": "unhealthy", "reason": "the engine is replacing its worker group"}
    assert _complete(cued, "heal").status_code == 200
    assert requests.get(f"{cued}/health", timeout=30).status_code == 200
