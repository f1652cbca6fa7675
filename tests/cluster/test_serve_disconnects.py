"""Clients that drop their streams midway: the engine aborts their requests and frees their KV blocks at once."""
from __future__ import annotations

import json
import threading

import pytest

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")

NUM_STREAMS = 24
KEPT_TOKENS = 24
# Far more than the test waits for: a dropped request that were not aborted would still be running at the end.
DROPPED_TOKENS = 400


def _stream(url: str, index: int, drop_after: int | None, results: dict) -> None:
    body = {"model": "tiny", "prompt": f"Story number {index}:", "temperature": 0, "ignore_eos": True, "stream": True,
            "max_tokens": KEPT_TOKENS if drop_after is None else DROPPED_TOKENS,
            "stream_options": {"include_usage": True}}
    try:
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as reply:
            events = []
            for line in reply.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                if drop_after is not None and len(events) >= drop_after:
                    results[index] = ("dropped", len(events))
                    return  # leaving the block closes the connection mid-stream
            results[index] = ("done", reply.status_code, events)
    except Exception as exc:  # recorded, and the test fails on it
        results[index] = ("error", repr(exc))


def test_dropped_streams_free_their_blocks_and_the_rest_complete(server: str, metrics) -> None:
    before = metrics.samples(server)
    results: dict = {}
    threads = [
        threading.Thread(target=_stream, args=(server, i, 3 if i % 3 == 0 else None, results))
        for i in range(NUM_STREAMS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert len(results) == NUM_STREAMS
    dropped = [i for i, r in results.items() if r[0] == "dropped"]
    assert sorted(dropped) == list(range(0, NUM_STREAMS, 3))
    for index, result in results.items():
        if index in dropped:
            continue
        assert result[0] == "done" and result[1] == 200, result
        events = result[2]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == KEPT_TOKENS
    after = metrics.wait_for(server, lambda s: s["rayinfer_num_requests_running"] == 0
                             and s["rayinfer_kv_cache_usage_ratio"] == 0)
    assert after["rayinfer_num_requests_running"] == 0
    assert after["rayinfer_num_requests_waiting"] == 0
    assert after["rayinfer_kv_cache_usage_ratio"] == 0
    aborted = after.get("rayinfer_request_success_total:abort", 0) - before.get("rayinfer_request_success_total:abort", 0)
    assert aborted == len(dropped)
    finished = after["rayinfer_request_success_total:length"] - before.get("rayinfer_request_success_total:length", 0)
    assert finished == NUM_STREAMS - len(dropped)
    generated = after["rayinfer_generation_tokens_total"] - before["rayinfer_generation_tokens_total"]
    assert generated < NUM_STREAMS * KEPT_TOKENS + len(dropped) * DROPPED_TOKENS / 4  # the dropped ones stopped early
