"""The scheduler actor streams deltas, aborts at once, and frees everything when a client goes away."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.configs import EngineConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def replica(llama_dir: Path, ray_session):
    from rayinfer.scheduler.actor import start_engine_replica

    replica = start_engine_replica(EngineConfig(model=str(llama_dir), tensor_parallel_size=2))
    yield replica
    replica.stop()


def _collect(ray, stream) -> list:
    return [ray.get(ref) for ref in stream]


def _wait_idle(ray, replica, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(replica.actor.stats.remote())
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 or time.monotonic() > deadline:
            return stats


def test_stream_of_deltas_adds_up_to_the_offline_output(replica, llama_dir: Path, ray_session) -> None:
    params = SamplingParams(max_tokens=20, stop=["zzz-not-there"], **GREEDY)
    expected = LLM(str(llama_dir)).generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    deltas = _collect(ray_session, replica.actor.generate.remote("s1", "Once upon a time", params))
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert sum((d.outputs[0].token_ids for d in deltas), []) == expected.token_ids
    assert "".join(d.outputs[0].text for d in deltas) == expected.text
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_concurrent_streams(replica, ray_session) -> None:
    streams = {f"c{i}": replica.actor.generate.remote(f"c{i}", "Hello", SamplingParams(max_tokens=5 + i, **GREEDY)) for i in range(4)}
    for i, (request_id, stream) in enumerate(streams.items()):
        tokens = sum((d.outputs[0].token_ids for d in _collect(ray_session, stream)), [])
        assert len(tokens) == 5 + i


def test_bad_request_raises_without_disturbing_others(replica, ray_session) -> None:
    good = replica.actor.generate.remote("ok", "Hello", SamplingParams(max_tokens=8, **GREEDY))
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        _collect(ray_session, replica.actor.generate.remote("bad", "", SamplingParams()))
    assert len(sum((d.outputs[0].token_ids for d in _collect(ray_session, good)), [])) == 8


def test_abort_ends_the_stream_and_frees_blocks(replica, ray_session) -> None:
    stream = replica.actor.generate.remote("long", "Hello", SamplingParams(max_tokens=400, **GREEDY))
    first = ray_session.get(next(stream))
    assert not first.finished
    ray_session.get(replica.actor.abort.remote("long"))
    rest = _collect(ray_session, stream)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    stats = _wait_idle(ray_session, replica)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_client_that_goes_away_frees_its_request(replica, ray_session) -> None:
    aborted_before = ray_session.get(replica.actor.stats.remote())["num_aborted_requests"]
    stream = replica.actor.generate.remote("gone", "Hello", SamplingParams(max_tokens=400, **GREEDY))
    ray_session.get(next(stream))
    ray_session.cancel(stream)
    stats = _wait_idle(ray_session, replica)
    assert stats["num_aborted_requests"] == aborted_before + 1, "the request ran on instead of being aborted"
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
