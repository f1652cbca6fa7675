"""One Serve instance for the session's HTTP tests: the tiny model's app at `/`, others under their own prefix."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rayinfer.cluster import LLM
from rayinfer.configs import EngineConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric_samples(url: str) -> dict[str, float]:
    """`/metrics` samples by name (one model, so one value each); per-reason counters as `name:reason`."""
    from prometheus_client.parser import text_string_to_metric_families

    import requests

    reply = requests.get(f"{url}/metrics", timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if "finished_reason" in sample.labels:  # e.g. rayinfer_request_success_total:abort
                samples[f"{sample.name}:{sample.labels['finished_reason']}"] = sample.value
            elif "le" not in sample.labels:
                samples[sample.name] = sample.value
    return samples


def _wait_for_metrics(url: str, predicate: Callable[[dict[str, float]], bool], timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _metric_samples(url)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


@pytest.fixture(scope="package")
def serve_instance(ray_session):
    """The root URL of a running Serve HTTP proxy on loopback."""
    serve = pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="package")
def server(serve_instance: str, llama_dir: Path) -> str:
    """The OpenAI app on the tiny model, served as `tiny`, reading tool calls in hermes' format (tool_choice "auto")."""
    from ray import serve

    from rayinfer.cluster.serve_app import build_app

    config = EngineConfig(model=str(llama_dir), tool_call_parser="hermes")
    serve.run(build_app(config, served_model_name="tiny"), name="rayinfer-test", route_prefix="/")
    return serve_instance


@pytest.fixture(scope="package")
def offline(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir))


class Metrics:
    """Reads the server's Prometheus metrics; replicas publish them a moment after things happen."""

    samples = staticmethod(_metric_samples)
    wait_for = staticmethod(_wait_for_metrics)


@pytest.fixture(scope="package")
def metrics() -> type[Metrics]:
    return Metrics
